"""gRPC Generate's in-flight bound (generate_max_concurrent): past it a stream is refused
RESOURCE_EXHAUSTED at once, counted in loraloop_requests_rejected; a slot frees when a stream
ends. Real gRPC over loopback; the engine and the adapter manager are fakes that hold each
request until the test lets it go (the bound is the logic under test, not generation)."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

import grpc
import pytest

from loraloop.v1 import rollout_pb2 as pb
from loraloop.v1 import rollout_pb2_grpc as pb_grpc
from services.common.config import AuthConfig, ServerConfig, TLSConfig
from services.common.grpc_server import Registration, serve
from services.rollout.config import RolloutConfig
from services.rollout.metrics import RolloutMetrics
from services.rollout.service import ROLES_OF_METHOD, SERVICE, RolloutServicer

pytestmark = pytest.mark.unit


class _Engine:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0

    async def generate(self, ids, sampling, handle, rid, priority=0):
        self.started += 1
        await self.release.wait()
        yield SimpleNamespace(index=0, token_ids=[5], text="x", logprobs=[-0.1], finished=True,
                              finish_reason="length")


class _Manager:
    @contextlib.asynccontextmanager
    async def acquire(self, selector):
        yield None  # the base model


async def _until(cond, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "not within the time"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _serving(engine: _Engine, limit: int, metrics: RolloutMetrics | None = None):
    """A real gRPC server on loopback with the servicer; yields (servicer, stub)."""
    codec = SimpleNamespace(check=lambda *a: None, encode=lambda text: [1, 2])
    servicer = RolloutServicer(engine, _Manager(), codec, RolloutConfig(generate_max_concurrent=limit), metrics)
    stop, port = asyncio.Event(), asyncio.get_running_loop().create_future()
    server = asyncio.create_task(serve(
        [Registration(pb_grpc.add_RolloutServicer_to_server, servicer, SERVICE)],
        ServerConfig(host="127.0.0.1", port=0, grace_s=0.5), AuthConfig(enabled=False), TLSConfig(),
        ROLES_OF_METHOD, on_started=port.set_result, stop_event=stop))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{await port}") as ch:
            yield servicer, pb_grpc.RolloutStub(ch)
    finally:
        stop.set()
        await server


def test_streams_past_the_bound_are_refused_resource_exhausted_and_slots_come_back():
    async def main():
        engine, metrics = _Engine(), RolloutMetrics()
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), params=pb.SamplingParams(max_tokens=1))
        async with _serving(engine, 2, metrics) as (servicer, stub):
            held = [stub.Generate(req) for _ in range(2)]
            readers = [asyncio.create_task(c.read()) for c in held]
            await _until(lambda: engine.started >= 2)
            assert servicer.in_flight == 2
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await asyncio.wait_for(stub.Generate(req).read(), 5)  # not held: refused at once
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "2 Generate streams in flight (generate_max_concurrent)" in refused.value.details()
            assert metrics.rejected.labels("grpc", "busy")._value.get() == 1
            engine.release.set()
            assert [(await r).finished for r in readers] == [True, True]
            for c in held:
                assert await c.code() == grpc.StatusCode.OK
            assert servicer.in_flight == 0
            again = [r async for r in stub.Generate(req)]  # the slots came back
            assert [r.token_ids for r in again] == [[5]] and servicer.in_flight == 0

    asyncio.run(main())


def test_a_cancelled_stream_gives_its_slot_back():
    async def main():
        engine = _Engine()
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]), params=pb.SamplingParams(max_tokens=1))
        async with _serving(engine, 1) as (servicer, stub):
            call = stub.Generate(req)
            reader = asyncio.create_task(call.read())
            await _until(lambda: engine.started >= 1)
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
            await _until(lambda: servicer.in_flight == 0)  # the stream's end ran its `finally`

    asyncio.run(main())
