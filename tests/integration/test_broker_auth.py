"""Bearer-token roles (issue 2, point 4): no token or an unknown one is UNAUTHENTICATED, a
role calling outside its rights is PERMISSION_DENIED; health and reflection stay open."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loraloop.v1 import adapters_pb2 as pb
from loraloop.v1 import adapters_pb2_grpc as pb_grpc
from tests.support.procs import TOKENS

CALLS = {
    "AcquirePublisher": lambda s, md: s.AcquirePublisher(pb.AcquirePublisherRequest(name="a"), metadata=md, timeout=10),
    "Pin": lambda s, md: s.Pin(pb.PinRequest(ref=pb.AdapterRef(name="a", version=1)), metadata=md, timeout=10),
    "Publish": lambda s, md: s.Publish(iter([pb.PublishRequest(header=pb.PublishHeader(name="a"))]),
                                       metadata=md, timeout=10),
    "ListAdapters": lambda s, md: s.ListAdapters(pb.ListAdaptersRequest(), metadata=md, timeout=10),
    "Watch": lambda s, md: next(iter(s.Watch(pb.WatchRequest(adapters=[pb.WatchFrom(name="a")]),
                                             metadata=md, timeout=1))),
}
DENIED = [  # (role, method) pairs the design forbids
    ("rollout", "AcquirePublisher"), ("rollout", "Publish"), ("rollout", "Pin"),
    ("client", "AcquirePublisher"), ("client", "Publish"), ("client", "Pin"), ("client", "Watch"),
]


def _md(token: str | None):
    return (("authorization", f"Bearer {token}"),) if token else ()


@pytest.fixture
def stub(broker):
    with grpc.insecure_channel(broker.target) as ch:
        yield pb_grpc.AdapterRegistryStub(ch), ch


@pytest.mark.parametrize("method", list(CALLS))
@pytest.mark.parametrize("token", [None, "not-a-token"])
def test_missing_or_unknown_token_is_unauthenticated(stub, method, token):
    with pytest.raises(grpc.RpcError) as err:
        CALLS[method](stub[0], _md(token))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("role,method", DENIED)
def test_wrong_role_is_permission_denied(stub, role, method):
    with pytest.raises(grpc.RpcError) as err:
        CALLS[method](stub[0], _md(TOKENS[role]))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_allowed_roles_pass_auth(stub):
    s, _ = stub
    assert s.ListAdapters(pb.ListAdaptersRequest(), metadata=_md(TOKENS["client"]), timeout=10).adapters == []
    assert s.AcquirePublisher(pb.AcquirePublisherRequest(name="a"), metadata=_md(TOKENS["learner"]),
                              timeout=10).epoch == 1
    with pytest.raises(grpc.RpcError) as err:  # passes auth, then the watch deadline ends it
        CALLS["Watch"](s, _md(TOKENS["rollout"]))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_health_and_reflection_need_no_token(stub):
    _, ch = stub
    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(
        service="loraloop.v1.AdapterRegistry"), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    out = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                         timeout=10))
    names = {s.name for s in out[0].list_services_response.service}
    assert {"loraloop.v1.AdapterRegistry", "grpc.health.v1.Health"} <= names
