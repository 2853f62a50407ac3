"""Shared pieces of the bad-input tests (tests/integration/test_bad_input_*.py, issue 19):
the hypothesis settings (bounded, derandomized: CI sees the same cases every run), raw gRPC
calls with identity serializers (bytes in, bytes out: malformed messages reach the server as
they are), the status checks, and a per-endpoint count of the cases sent, printed at the end
of the pytest run."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

import grpc
import pytest
from hypothesis import HealthCheck, settings

# Never the answer to a caller's bad input: a server bug (or a dead/hung server).
WRONG = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS,
                   grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                   grpc.StatusCode.CANCELLED, grpc.StatusCode.UNIMPLEMENTED})
CLEAR = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
                   grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION})


def bounded(max_examples: int) -> settings:
    """At most `max_examples` cases, the same ones every run, no per-case deadline (the real
    servers share 2 cores with the rest of CI), no example database written."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much,
                                           HealthCheck.function_scoped_fixture])


class CaseCount:
    """Cases sent per endpoint, printed once in pytest's terminal summary."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(self, endpoint: str, n: int = 1) -> None:
        self.counts[endpoint] += n

    def pytest_terminal_summary(self, terminalreporter) -> None:  # a pytest hook
        if not self.counts:
            return
        terminalreporter.write_sep("-", f"bad-input cases sent: {sum(self.counts.values())}")
        for endpoint, n in sorted(self.counts.items()):
            terminalreporter.write_line(f"{n:6d}  {endpoint}")


CASES = CaseCount()


def register_summary(config: pytest.Config) -> None:
    if not config.pluginmanager.is_registered(CASES):
        config.pluginmanager.register(CASES, "bad-input-cases")


def _ident(b: bytes) -> bytes:
    return b


class Outcome:
    """How one call ended: its status code (OK or the error's), details, responses read."""

    def __init__(self, code: grpc.StatusCode, details: str = "", responses: list | None = None) -> None:
        self.code, self.details, self.responses = code, details, responses or []

    def __repr__(self) -> str:
        return f"Outcome({self.code.name}, {self.details[:200]!r}, {len(self.responses)} responses)"


def call_raw(channel: grpc.Channel, method: str, kind: str, payload: bytes | Iterable[bytes],
             metadata: tuple, timeout: float = 10.0, first_only: bool = False) -> Outcome:
    """Send `payload` (bytes, or an iterable of them for client-streaming methods) to `method`
    as is. kind: "uu", "us", "su", "ss" (unary/stream request, unary/stream response).
    `first_only`: read one streamed response, then cancel (a stream that follows live)."""
    try:
        if kind == "uu":
            return Outcome(grpc.StatusCode.OK, responses=[channel.unary_unary(
                method, request_serializer=_ident, response_deserializer=_ident)(
                payload, metadata=metadata, timeout=timeout)])
        if kind == "su":
            return Outcome(grpc.StatusCode.OK, responses=[channel.stream_unary(
                method, request_serializer=_ident, response_deserializer=_ident)(
                iter(payload), metadata=metadata, timeout=timeout)])
        fn = channel.unary_stream if kind == "us" else channel.stream_stream
        call = fn(method, request_serializer=_ident, response_deserializer=_ident)(
            payload if kind == "us" else iter(payload), metadata=metadata, timeout=timeout)
        return read_stream(call, first_only)
    except grpc.RpcError as e:
        return Outcome(e.code(), e.details() or "")


def read_stream(call, first_only: bool = False) -> Outcome:
    out = []
    try:
        for r in call:
            out.append(r)
            if first_only:
                call.cancel()
                return Outcome(grpc.StatusCode.OK, responses=out)
    except grpc.RpcError as e:
        return Outcome(e.code(), e.details() or "", out)
    return Outcome(grpc.StatusCode.OK, responses=out)


def assert_clear(outcome: Outcome, allowed: Iterable[grpc.StatusCode] = CLEAR, ok: bool = True,
                 what: object = "") -> None:
    """The call succeeded (if `ok` allows it) or failed with one of `allowed`, with a message."""
    allowed = frozenset(allowed)
    if outcome.code == grpc.StatusCode.OK:
        assert ok, f"{what}: accepted, expected one of {sorted(c.name for c in allowed)}"
        return
    assert outcome.code not in WRONG, f"{what}: {outcome}"
    assert outcome.code in allowed, f"{what}: {outcome}, expected one of {sorted(c.name for c in allowed)}"
    assert outcome.details, f"{what}: {outcome.code.name} without a message"


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
