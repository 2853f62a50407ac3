"""The interceptor's pure parts: status mapping by exception type, and the access policy."""

import grpc
import pytest

from services.common import errors
from services.common.grpc_server import AccessPolicy, status_of


class StaleEpoch(errors.FailedPrecondition):
    pass


@pytest.mark.parametrize("exc,code", [
    (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
    (StaleEpoch("x"), grpc.StatusCode.FAILED_PRECONDITION),  # subclasses map like their base
    (errors.ResourceExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
    (ValueError("x"), grpc.StatusCode.INTERNAL),  # unknown: internal, and logged
])
def test_status_of(exc, code):
    assert status_of(exc) == code


POLICY = AccessPolicy({"/s/Publish": frozenset({"learner"}), "/s/Get": frozenset({"learner", "client"})},
                      {"tl": "learner", "tc": "client"})


def test_policy_roles():
    assert POLICY.check("/s/Publish", [("authorization", "Bearer tl")]) == "learner"
    assert POLICY.check("/s/Get", [("authorization", "Bearer tc")]) == "client"
    with pytest.raises(errors.PermissionDenied):
        POLICY.check("/s/Publish", [("authorization", "Bearer tc")])
    with pytest.raises(errors.PermissionDenied):  # unlisted methods are closed
        POLICY.check("/s/Other", [("authorization", "Bearer tl")])


@pytest.mark.parametrize("md", [[], [("authorization", "tl")], [("authorization", "Bearer nope")],
                                [("authorization", "Basic tl")]])
def test_policy_unauthenticated(md):
    with pytest.raises(errors.Unauthenticated):
        POLICY.check("/s/Get", md)


def test_health_open_and_auth_off():
    assert POLICY.check("/grpc.health.v1.Health/Check", []) is None
    assert AccessPolicy({}, {}, enabled=False).check("/s/Publish", []) is None


def test_tokens_compared_in_constant_time_every_one_in_full(monkeypatch):
    """Tokens are checked with hmac.compare_digest (no `==`, whose time depends on the first
    differing byte), against every configured token, the matching one first or not (issue 19)."""
    import hmac

    from services.common import grpc_server

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(grpc_server.hmac, "compare_digest", spy)
    policy = AccessPolicy({"/s/Get": frozenset({"learner", "client"})}, {"tl": "learner", "tc": "client", "tx": "client"})
    assert policy.check("/s/Get", [("authorization", "Bearer tl")]) == "learner"
    assert sorted(a for a, _ in calls) == [b"tc", b"tl", b"tx"] and {b for _, b in calls} == {b"tl"}
    calls.clear()
    with pytest.raises(errors.Unauthenticated):
        policy.check("/s/Get", [("authorization", "Bearer tl-but-longer")])
    assert len(calls) == 3
