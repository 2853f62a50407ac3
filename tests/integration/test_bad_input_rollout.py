"""Bad input against a real rollout server (vLLM CPU engine, tiny model) over loopback, through
both its fronts (issue 19, "Bad input, everywhere it enters"): raw bytes to Generate,
ListAdapters and WatchAdapters; Generate with token ids outside the vocabulary, prompts longer
than the model, `n` and `max_tokens` at and past their limits, NaN/inf sampling values, unknown,
pinned-past-latest and malformed adapter selectors; every HTTP endpoint with bodies of wrong
types, invalid UTF-8, NaN literals, JSON nested too deep, an oversized body, unknown paths and
methods; streams cut off mid-way (gRPC cancel, a socket closed mid-SSE) and slow readers.

Each gets a clear status (gRPC: INVALID_ARGUMENT/NOT_FOUND/...; HTTP: 400/404/405/413/422 in
OpenAI error JSON), never INTERNAL/UNKNOWN/500, never a hang; after each batch the server
serves a good request on both fronts, its adapter list is what it was, nothing is left in
flight. The server is the session's shared rollout (tests/integration/conftest.py), so its
engine start is paid once for the whole run."""

from __future__ import annotations

import json
import math
import re
import socket
import time
from dataclasses import dataclass

import grpc
import httpx
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from loraloop.v1 import rollout_pb2 as pb
from services.broker.client import BrokerClient
from tests.support.bad_input import CASES, assert_clear, bounded, call_raw, register_summary
from tests.support.peft_adapters import make_peft_adapter
from tests.support.procs import TOKENS

SVC = "/loraloop.v1.Rollout/"
MD = (("authorization", f"Bearer {TOKENS['client']}"),)
AUTH = {"authorization": f"Bearer {TOKENS['client']}"}
ADAPTER = "badin"  # two versions published for these tests
MAX_LEN = 512  # engine.max_model_len (default)
MAX_N = 64
PROMPT = [1, 6, 13, 11, 14]  # "<bos>3+8="
HTTP_OK = {200}
HTTP_CLEAR = {400, 404, 405, 413, 422}


@dataclass
class Replica:
    target: str
    http: str  # http://127.0.0.1:PORT
    base_id: str
    channel: grpc.Channel
    vocab: int
    versions: tuple[int, int]  # of ADAPTER


@pytest.fixture(scope="module")
def replica(rollout_stack, tmp_path_factory, request):
    register_summary(request.config)
    s = rollout_stack
    vocab = int(json.loads((s.model / "config.json").read_text())["vocab_size"])
    with BrokerClient(s.broker.target, TOKENS["learner"]) as c:
        epoch, _ = c.acquire_publisher(ADAPTER)
        d = make_peft_adapter(s.model, tmp_path_factory.mktemp("bad-input-rollout") / ADAPTER, seed=31, rank=4)
        versions = tuple(c.publish_dir(ADAPTER, epoch, d, s.fingerprint)[0].version for _ in range(2))
    # the cases name v1 and v2 (loaded before the first snapshot) and v3, v9 as unknown versions
    assert versions == (1, 2), f"{ADAPTER} was published before this module: {versions}"
    channel = grpc.insecure_channel(s.rollout.target)
    r = Replica(s.rollout.target, s.rollout.openai_base_url.removesuffix("/v1"), str(s.model), channel, vocab,
                versions)
    for sel in (f"{ADAPTER}@v{versions[0]}", ADAPTER):  # both versions loaded before the first snapshot
        assert _generate(r, pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), adapter=sel,
                                               params=pb.SamplingParams(max_tokens=1))).code == grpc.StatusCode.OK
    yield r
    channel.close()


def _generate(r: Replica, req: pb.GenerateRequest, timeout: float = 60.0, first_only: bool = False):
    return call_raw(r.channel, SVC + "Generate", "us", req.SerializeToString(), MD, timeout=timeout,
                    first_only=first_only)


def _loaded(r: Replica) -> pb.ListLoadedResponse:
    out = call_raw(r.channel, SVC + "ListAdapters", "uu", b"", MD)
    assert out.code == grpc.StatusCode.OK, out
    return pb.ListLoadedResponse.FromString(out.responses[0])


def _in_flight(r: Replica) -> float:
    text = httpx.get(f"{r.http}/metrics", timeout=10).text
    m = re.search(r'^loraloop_requests_in_flight\{source="http"\} (\S+)', text, re.M)
    return float(m.group(1)) if m else 0.0


def snapshot(r: Replica) -> tuple:
    """The adapter versions loaded and how they stand, once nothing is running any more."""
    deadline = time.monotonic() + 20
    while True:
        snap = _loaded(r)
        idle = all(a.active_requests == 0 for a in snap.adapters) and _in_flight(r) == 0
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert idle, f"requests still in flight after the batch: {snap}"
    return (sorted((a.name, a.version, a.latest, a.followed) for a in snap.adapters),
            sorted((x.name, x.version) for x in snap.refused), snap.base_model_fingerprint, snap.max_lora_rank)


@pytest.fixture
def unchanged(replica):
    """Same adapter list after the test, nothing left in flight, and both fronts still serve."""
    before = snapshot(replica)
    yield
    assert snapshot(replica) == before
    good = _generate(replica, pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), adapter=f"{ADAPTER}@v{replica.versions[1]}",
                                                 params=pb.SamplingParams(max_tokens=2, ignore_eos=True)))
    assert good.code == grpc.StatusCode.OK and len(good.responses) >= 1, good
    r = httpx.post(f"{replica.http}/v1/completions", headers=AUTH, timeout=60,
                   json={"model": f"{ADAPTER}@v{replica.versions[0]}", "prompt": "3+8=", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == f"{ADAPTER}@v{replica.versions[0]}", r.text
    assert httpx.get(f"{replica.http}/health", timeout=10).text == "ok"


# ------------------------------------------------------------------ gRPC: raw bytes


def _corrupt(template: bytes):
    n = len(template)
    return st.one_of(
        st.integers(0, n - 1).map(lambda i: template[:i]),
        st.tuples(st.integers(0, n - 1), st.integers(1, 255)).map(
            lambda t: template[: t[0]] + bytes([template[t[0]] ^ t[1]]) + template[t[0] + 1:]),
        st.just(b"\x0a\x03\xff\xfe\xfd" + template),  # text (field 1) that is not UTF-8
        st.just(template + b"\x22\x02\xc0\xaf"),  # adapter (field 4): an overlong UTF-8 encoding
    )


GOOD_GENERATE = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), adapter=ADAPTER,
                                   params=pb.SamplingParams(max_tokens=2)).SerializeToString()


@bounded(60)
@given(method=st.sampled_from(["Generate", "ListAdapters", "WatchAdapters"]),
       payload=st.one_of(st.binary(max_size=40), _corrupt(GOOD_GENERATE)))
def test_raw_bytes(replica, unchanged, method, payload):
    CASES(f"rollout {method} (raw bytes)")
    kind = "uu" if method == "ListAdapters" else "us"
    out = call_raw(replica.channel, SVC + method, kind, payload, MD, timeout=60,
                   first_only=method == "WatchAdapters")  # it follows live: one snapshot, then cancel
    assert_clear(out, what=payload)


# ------------------------------------------------------------------ gRPC: Generate


OUT_OF_VOCAB = st.one_of(st.sampled_from([16, 99, 2**31, 2**32 - 1]), st.integers(16, 2**32 - 1))
SELECTORS = st.one_of(
    st.sampled_from(["", ADAPTER, f"{ADAPTER}@latest", f"{ADAPTER}@v1", f"{ADAPTER}@v2", f"{ADAPTER}@v3",
                     f"{ADAPTER}@v0", f"{ADAPTER}@v99999999999999999999999", "nope", "nope@v1", "Bad Name",
                     "@", "a@b@c", "..", ADAPTER + "@v-1", "x" * 65]),
    st.text(max_size=12))


@st.composite
def generate_request(draw, vocab: int):
    ids = draw(st.one_of(
        st.lists(st.integers(0, vocab - 1), min_size=1, max_size=8),
        st.lists(st.integers(0, vocab - 1), min_size=MAX_LEN - 2, max_size=MAX_LEN + 8),  # around the context
        st.tuples(st.lists(st.integers(0, vocab - 1), max_size=4), OUT_OF_VOCAB).map(lambda t: [*t[0], t[1]]),
        st.just([]),
    ))
    text = draw(st.one_of(st.none(), st.text(max_size=20), st.just("1" * 600), st.just("\x00\ufffd\U0010ffff")))
    p = pb.SamplingParams(
        max_tokens=draw(st.sampled_from([0, 1, 2, 4, MAX_LEN - 6, MAX_LEN - 5, MAX_LEN, 2**31, 2**32 - 1])),
        n=draw(st.sampled_from([0, 1, 2, MAX_N, MAX_N + 1, 2**32 - 1])),
        temperature=draw(st.sampled_from([0.0, 1e-30, 0.7, 2.0, 2.5, 1e30, -1.0, math.nan, math.inf, -math.inf])),
        top_p=draw(st.sampled_from([0.0, 0.5, 1.0, 1.5, -0.1, math.nan, math.inf])),
        top_k=draw(st.sampled_from([0, -1, 1, -(2**31), 2**31 - 1])),
        stop=draw(st.sampled_from([[], ["1"], [""], ["x" * 10_000]])),
        stop_token_ids=draw(st.sampled_from([[], [2], [vocab], [2**32 - 1]])),
        logprobs=draw(st.booleans()), ignore_eos=draw(st.booleans()))
    seed = draw(st.sampled_from([None, 0, -(2**63), 2**63 - 1]))
    if seed is not None:
        p.seed = seed
    req = pb.GenerateRequest(params=p, adapter=draw(SELECTORS), request_id=draw(st.sampled_from(["", "r", "x" * 5000])))
    if text is None:
        req.token_ids.ids.extend(ids)
    else:
        req.text = text
    return req


@bounded(80)
@given(data=st.data())
def test_generate_with_any_parameters(replica, unchanged, data):
    req = data.draw(generate_request(replica.vocab))
    p = req.params
    n, max_tokens = p.n or 1, p.max_tokens or 64
    # a valid request with this many tokens to generate would take the engine long: not drawn
    assume(n * max_tokens <= 600 or n > MAX_N or max_tokens > MAX_LEN)
    CASES("rollout Generate")
    out = _generate(replica, req)
    assert_clear(out, what=req)
    ids = list(req.token_ids.ids)
    if req.HasField("token_ids") and (not ids or max(ids) >= replica.vocab):
        assert out.code == grpc.StatusCode.INVALID_ARGUMENT, (out, ids[-3:])
    if n > MAX_N or (req.HasField("token_ids") and ids and len(ids) + max_tokens > MAX_LEN):
        assert out.code == grpc.StatusCode.INVALID_ARGUMENT, out
    if out.code != grpc.StatusCode.OK:
        return
    msgs = [pb.GenerateResponse.FromString(m) for m in out.responses]
    finished = {m.index for m in msgs if m.finished}
    assert finished == set(range(n)), (n, finished)  # every sample ended, none twice
    for k in range(n):
        tokens = [t for m in msgs if m.index == k for t in m.token_ids]
        assert len(tokens) <= max_tokens and all(0 <= t < replica.vocab for t in tokens)
    if req.adapter:
        assert {m.adapter_name for m in msgs} == {ADAPTER} and {m.adapter_version for m in msgs} <= set(replica.versions)


# ------------------------------------------------------------------ HTTP


def _json_value(depth: int = 2):
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=12),
                        st.floats(allow_nan=False, allow_infinity=False))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                        max_leaves=6)


COMMON_FIELDS = {
    "model": st.one_of(st.sampled_from(["", ADAPTER, f"{ADAPTER}@v1", f"{ADAPTER}@v9", "nope",
                                        f"{ADAPTER}@v99999999999999999999999", "Bad Name"]), _json_value()),
    "max_tokens": st.one_of(st.sampled_from([1, 2, 0, -1, MAX_LEN, MAX_LEN + 1, 2**40, "2", 2.5, None]),
                            _json_value()),
    "n": st.one_of(st.sampled_from([1, 2, 0, -1, MAX_N, MAX_N + 1, 16384, 2**40, "2"]), _json_value()),
    "temperature": st.one_of(st.sampled_from([0, 0.7, 2, 2.5, -1, "hot", None, 1e308]), _json_value()),
    "top_p": st.sampled_from([0.5, 1, 1.5, -1, 0]),
    "stream": st.one_of(st.booleans(), _json_value()),
    "stop": st.one_of(st.sampled_from([[""], ["1"], "1", [1], []]), _json_value()),
    "seed": st.sampled_from([0, -1, 2**63, 2**70, "x"]),
    "logprobs": st.one_of(st.sampled_from([0, 1, 20, 21, -1, True]), _json_value()),
    "stop_token_ids": st.sampled_from([[2], [16], [2**40], [-1], "x"]),
    "priority": st.sampled_from([0, -(2**70), 2**70, "x"]),
    "stream_options": st.one_of(st.just({"include_usage": True}), _json_value()),
}
COMPLETION_FIELDS = {
    **COMMON_FIELDS,
    "prompt": st.one_of(st.sampled_from(["3+8=", "", "1" * 600, [1, 6], [], [[]], [99], [-1], [2**40], [1] * 600,
                                         ["3+8="] * 3, "\x00\ufffd"]), _json_value()),
    "echo": st.booleans(),
}
CHAT_FIELDS = {
    **COMMON_FIELDS,
    "messages": st.one_of(st.sampled_from([[{"role": "user", "content": "3+8="}], [], [{"role": "bogus"}], [5],
                                           [{"role": "user", "content": "1" * 600}],
                                           [{"role": "user", "content": [{"type": "image_url",
                                                                          "image_url": {"url": "http://127.0.0.1:9/x"}}]}]]),
                          _json_value()),
    "max_completion_tokens": st.sampled_from([1, -1, 2**40]),
    "top_logprobs": st.sampled_from([0, 20, 21, -1]),
    "chat_template": st.sampled_from(["{% for", "{{ raise_exception('x') }}"]),
}


@st.composite
def http_body(draw, fields: dict, required: tuple[str, ...]):
    """A request body: the required fields with a good value most of the time, plus other
    fields with values of any type; max_tokens small unless drawn otherwise."""
    good = {"model": f"{ADAPTER}@v1", "prompt": "3+8=", "messages": [{"role": "user", "content": "3+8="}],
            "max_tokens": 2}
    body = {k: good[k] for k in required if draw(st.integers(0, 3)) > 0}
    for k in draw(st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True)):
        body[k] = draw(fields[k])
    return body


def _tokens_asked(body: dict) -> bool:
    """Whether a valid body could make the engine generate for long (skipped)."""
    def num(x, default):
        return x if isinstance(x, int) and not isinstance(x, bool) and x > 0 else default
    n = num(body.get("n"), 1)
    mt = num(body.get("max_tokens", body.get("max_completion_tokens")), MAX_LEN)
    return n <= MAX_N and n * min(mt, MAX_LEN) > 600


def _check_http(resp: httpx.Response, what: object) -> None:
    assert resp.status_code in HTTP_OK | HTTP_CLEAR, (resp.status_code, resp.text[:300], what)
    if resp.status_code != 200:
        err = resp.json()["error"]
        assert err["message"] and err["code"] == resp.status_code, (resp.text[:300], what)
        return
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [ln for ln in resp.text.splitlines() if ln.startswith("data: ")]
        assert lines and lines[-1] == "data: [DONE]", resp.text[-300:]
        for ln in lines[:-1]:
            json.loads(ln.removeprefix("data: "))  # every event is JSON (an error event included)
    else:
        assert "choices" in resp.json(), resp.text[:300]


@bounded(70)
@given(endpoint=st.sampled_from(["completions", "chat/completions"]), data=st.data())
def test_http_bodies_of_any_shape(replica, unchanged, endpoint, data):
    fields, required = ((COMPLETION_FIELDS, ("model", "prompt", "max_tokens")) if endpoint == "completions"
                        else (CHAT_FIELDS, ("model", "messages", "max_tokens")))
    body = data.draw(http_body(fields, required))
    assume(not _tokens_asked(body))
    CASES(f"rollout HTTP /v1/{endpoint}")
    resp = httpx.post(f"{replica.http}/v1/{endpoint}", json=body, headers=AUTH, timeout=60)
    _check_http(resp, body)
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > MAX_N:
        assert resp.status_code == 400, resp.text[:200]


RAW_BODIES = [
    b"", b"{", b"[]", b"5", b"null", b'"x"', b"\xff\xfe\x00", b'{"model": "\xff", "prompt": "1"}',
    b'{"prompt": "1", "max_tokens": 2, "temperature": NaN}', b'{"prompt": "1", "max_tokens": Infinity}',
    b'{"prompt": "1", "max_tokens": 2, "top_p": -Infinity}', b"[" * 100_000 + b"]" * 100_000,
    b'{"a": ' * 5000 + b"1" + b"}" * 5000, b'{"prompt": "1", "max_tokens": 2, "prompt": 5}',
    b'{"prompt": "\\ud800", "max_tokens": 2}', b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}',
]


@bounded(40)
@given(endpoint=st.sampled_from(["completions", "chat/completions"]),
       content=st.one_of(st.sampled_from(RAW_BODIES), st.binary(max_size=64)),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"]))
def test_http_bytes_that_are_not_a_request(replica, unchanged, endpoint, content, content_type):
    CASES(f"rollout HTTP /v1/{endpoint} (raw bytes)")
    resp = httpx.post(f"{replica.http}/v1/{endpoint}", content=content, timeout=60,
                      headers={**AUTH, "content-type": content_type})
    _check_http(resp, content[:80])


def _raw_http(port: int, request: bytes, read_until: bytes | None = None, timeout: float = 30.0) -> bytes:
    """Send `request` on a plain socket; read until the server closes or `read_until` shows."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        got = b""
        while read_until is None or read_until not in got:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def _port(replica: Replica) -> int:
    return int(replica.http.rsplit(":", 1)[1])


def test_http_oversized_and_odd_requests(replica, unchanged):
    """A body past the limit (declared, or sent chunked), auth headers that are not ASCII,
    unknown paths, wrong methods, junk query strings: all answered, as OpenAI error JSON."""
    big = json.dumps({"model": "", "prompt": "1" * (33 << 20), "max_tokens": 1}).encode()
    r = httpx.post(f"{replica.http}/v1/completions", content=big, headers={**AUTH, "content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and r.json()["error"]["message"], r.text[:200]

    def chunks():
        for _ in range(40):
            yield b"1" * (1 << 20)

    r = httpx.post(f"{replica.http}/v1/completions", content=chunks(), headers=AUTH, timeout=60)
    assert r.status_code == 413, r.text[:200]
    port = _port(replica)
    head = (b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 99999999999\r\nauthorization: Bearer " + TOKENS["client"].encode() + b"\r\n\r\n{")
    assert b" 413 " in _raw_http(port, head, read_until=b"\r\n\r\n").split(b"\r\n")[0] + b" "
    for auth in (b"Bearer \xff\xfe", b"Bearer", b"Basic x", b"Bearer " + b"t" * 10_000):
        got = _raw_http(port, b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: " + auth
                        + b"\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 401"), got[:200]
    for method, path, want in (("GET", "/v1/nope", 404), ("GET", "/v1/completions", 405), ("POST", "/health", 405),
                               ("DELETE", "/v1/models", 405)):
        r = httpx.request(method, f"{replica.http}{path}", headers=AUTH, timeout=30)
        assert r.status_code == want, (method, path, r.status_code, r.text[:200])
        if want != 200:
            assert r.json()["error"]["message"], r.text
    for q in ("?x=%ff%fe", "?" + "a" * 8000, "?format=json&x=\u00e9"):
        for path in ("/health", "/metrics", "/v1/models"):
            r = httpx.get(f"{replica.http}{path}{q}", headers=AUTH, timeout=30)
            assert r.status_code == 200, (path, q, r.status_code)
    CASES("rollout HTTP (oversized bodies)", 3)
    CASES("rollout HTTP (bad auth headers)", 4)
    CASES("rollout HTTP (unknown paths, wrong methods)", 5)
    CASES("rollout HTTP GET /health, /metrics, /v1/models (junk queries)", 9)


# ------------------------------------------------------------------ cut off, slow


def _sse_request(endpoint: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST /v1/{endpoint} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer {TOKENS['client']}\r\ncontent-length: {len(data)}\r\n\r\n").encode() + data


def test_streams_cut_off_mid_way(replica, unchanged):
    """gRPC Generate and WatchAdapters cancelled after their first message; HTTP streams whose
    socket closes after the first SSE event, before it, and mid-request. The snapshot after the
    test (the `unchanged` fixture) waits for nothing to be in flight."""
    for sel in ("", ADAPTER, f"{ADAPTER}@v1"):
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), adapter=sel,
                                 params=pb.SamplingParams(max_tokens=200, n=4, temperature=1.0, ignore_eos=True))
        out = _generate(replica, req, first_only=True)
        assert out.code == grpc.StatusCode.OK and len(out.responses) == 1, out
    out = call_raw(replica.channel, SVC + "WatchAdapters", "us", b"", MD, first_only=True)
    assert out.code == grpc.StatusCode.OK and out.responses
    port = _port(replica)
    for endpoint, body in (("completions", {"model": ADAPTER, "prompt": "3+8=", "max_tokens": 200, "stream": True,
                                            "ignore_eos": True}),
                           ("chat/completions", {"model": f"{ADAPTER}@v1", "messages": [{"role": "user",
                                                 "content": "3+8="}], "max_tokens": 200, "stream": True,
                                                 "ignore_eos": True})):
        got = _raw_http(port, _sse_request(endpoint, body), read_until=b"data: ")
        assert got.startswith(b"HTTP/1.1 200"), got[:200]  # closed right after the first event
        _raw_http(port, _sse_request(endpoint, body), read_until=b"\r\n\r\n")  # after the headers
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # mid-body
            s.sendall(_sse_request(endpoint, body)[:-10])
    CASES("rollout Generate (cancelled)", 3)
    CASES("rollout WatchAdapters (cancelled)")
    CASES("rollout HTTP streams (socket closed)", 6)


def test_slow_readers(replica, unchanged):
    """A gRPC stream and an SSE stream read slowly (bounded: 24 tokens, ~2 s each) still come
    whole."""
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), adapter=ADAPTER,
                             params=pb.SamplingParams(max_tokens=24, ignore_eos=True, temperature=0))
    call = replica.channel.unary_stream(SVC + "Generate", request_serializer=lambda b: b,
                                        response_deserializer=pb.GenerateResponse.FromString)(
        req.SerializeToString(), metadata=MD, timeout=60)
    tokens = []
    for m in call:
        tokens += m.token_ids
        time.sleep(0.08)
    assert len(tokens) == 24
    with socket.create_connection(("127.0.0.1", _port(replica)), timeout=60) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        s.sendall(_sse_request("completions", {"model": ADAPTER, "prompt": "3+8=", "max_tokens": 24, "stream": True,
                                               "ignore_eos": True, "temperature": 0,
                                               "stream_options": {"include_usage": True}}))
        got = b""
        while b"data: [DONE]" not in got:
            chunk = s.recv(256)
            assert chunk, got[-300:]
            got += chunk
            time.sleep(0.02)
    events = [json.loads(ln[6:]) for ln in got.decode().splitlines() if ln.startswith("data: {")]
    assert events[-1]["usage"]["completion_tokens"] == 24, events[-1]
    CASES("rollout Generate (slow reader)")
    CASES("rollout HTTP /v1/completions (slow SSE reader)")


# ------------------------------------------------------------------ each input that broke a server once


def _req(ids=PROMPT, adapter="", **params) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), adapter=adapter, params=pb.SamplingParams(**params))


GRPC_CASES = [  # (request, status, samples expected when OK)
    (_req(max_tokens=2, temperature=math.nan), grpc.StatusCode.INVALID_ARGUMENT, 0),  # was INTERNAL
    (_req(max_tokens=2, temperature=math.inf), grpc.StatusCode.INVALID_ARGUMENT, 0),  # was INTERNAL
    (_req(max_tokens=2, temperature=1e30), grpc.StatusCode.INVALID_ARGUMENT, 0),  # was INTERNAL
    (_req(max_tokens=2, stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, 0),  # was INTERNAL
    (_req(max_tokens=2, stop_token_ids=[2**32 - 1]), grpc.StatusCode.INVALID_ARGUMENT, 0),  # was INTERNAL
    (_req(adapter=f"{ADAPTER}@v{10**25}", max_tokens=1), grpc.StatusCode.INVALID_ARGUMENT, 0),  # was INTERNAL
    (_req(ids=[2**32 - 1], max_tokens=1), grpc.StatusCode.INVALID_ARGUMENT, 0),
    (_req(ids=[1] * 600, max_tokens=1), grpc.StatusCode.INVALID_ARGUMENT, 0),
    (_req(max_tokens=MAX_LEN - len(PROMPT) + 1), grpc.StatusCode.INVALID_ARGUMENT, 0),
    (_req(max_tokens=MAX_LEN - len(PROMPT), temperature=0), grpc.StatusCode.OK, 1),  # at the limit
    (_req(n=MAX_N + 1, temperature=1.0, max_tokens=1), grpc.StatusCode.INVALID_ARGUMENT, 0),
    (_req(n=MAX_N, temperature=1.0, max_tokens=1), grpc.StatusCode.OK, MAX_N),  # at the limit
    (_req(adapter=f"{ADAPTER}@v999999", max_tokens=1), grpc.StatusCode.NOT_FOUND, 0),
]


def test_generate_inputs_that_broke_it(replica, unchanged):
    for req, code, samples in GRPC_CASES:
        out = _generate(replica, req)
        assert out.code == code, (req.params, req.adapter, out)
        if code == grpc.StatusCode.OK:
            msgs = [pb.GenerateResponse.FromString(m) for m in out.responses]
            assert {m.index for m in msgs if m.finished} == set(range(samples))
            assert sum(len(m.token_ids) for m in msgs) <= samples * (req.params.max_tokens or 64)
    CASES("rollout Generate (regressions)", len(GRPC_CASES))


HTTP_CASES = [  # (endpoint, body, status)
    ("completions", {"model": "", "prompt": "", "max_tokens": 2}, 400),  # was 500 (and the connection closed)
    ("completions", b"[" * 100_000 + b"]" * 100_000, 400),  # was 500 (RecursionError)
    ("completions", {"model": "", "prompt": "3+8=", "max_tokens": 1, "n": MAX_N + 1, "temperature": 1}, 400),  # was 200
    ("chat/completions", {"model": "", "messages": [{"role": "user", "content": "1"}], "max_tokens": 1,
                          "n": 10_000, "temperature": 1}, 400),  # was 200 after 5 s of generation
    ("completions", {"model": "", "prompt": "3+8=", "max_tokens": 1, "n": MAX_N, "temperature": 1}, 200),
    ("completions", {"model": f"{ADAPTER}@v{10**25}", "prompt": "1", "max_tokens": 1}, 404),
    ("completions", {"model": "", "prompt": "1", "max_tokens": 2**40}, 400),
    ("completions", {"model": "", "prompt": [2**40], "max_tokens": 1}, 400),
    ("completions", {"model": "", "prompt": [1] * 600, "max_tokens": 1}, 400),
    ("chat/completions", {"model": f"{ADAPTER}@v999999", "messages": [{"role": "user", "content": "1"}]}, 404),
]


def test_http_inputs_that_broke_it(replica, unchanged):
    for endpoint, body, status in HTTP_CASES:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(f"{replica.http}/v1/{endpoint}", headers={**AUTH, "content-type": "application/json"},
                       timeout=60, **kw)
        assert r.status_code == status, (endpoint, str(body)[:80], r.status_code, r.text[:200])
        if status != 200:
            assert r.json()["error"]["message"]
    CASES("rollout HTTP (regressions)", len(HTTP_CASES))
