"""The Rollout gRPC servicer: Generate, ListAdapters, WatchAdapters. The process that runs it
(engine, adapter manager, follower, training worker) is services.rollout.app."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from loraloop.v1 import rollout_pb2 as pb
from loraloop.v1 import rollout_pb2_grpc as pb_grpc
from services.common.errors import ResourceExhausted
from services.rollout.adapters import AdapterManager
from services.rollout.config import RolloutConfig
from services.rollout.engine import Engine
from services.rollout.metrics import RolloutMetrics
from services.rollout.requests import TokenCodec, sampling_from_pb

SERVICE = "loraloop.v1.Rollout"
_ANY = frozenset({"client", "learner", "rollout"})
ROLES_OF_METHOD = {f"/{SERVICE}/Generate": _ANY, f"/{SERVICE}/ListAdapters": _ANY,
                   f"/{SERVICE}/WatchAdapters": _ANY}


class RolloutServicer(pb_grpc.RolloutServicer):
    def __init__(self, engine: Engine, manager: AdapterManager, codec: TokenCodec, cfg: RolloutConfig,
                 metrics: RolloutMetrics | None = None) -> None:
        self.engine, self.manager, self.codec, self.cfg = engine, manager, codec, cfg
        self.metrics = metrics or RolloutMetrics()
        self.in_flight = 0
        self.metrics.in_flight.labels("grpc").set_function(lambda: self.in_flight)

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        # The slot is taken at the check, before anything awaits, so a burst cannot pass it together.
        if self.in_flight >= self.cfg.generate_max_concurrent:
            self.metrics.rejected.labels("grpc", "busy").inc()
            raise ResourceExhausted(f"{self.in_flight} Generate streams in flight (generate_max_concurrent); "
                                    "retry later")
        self.in_flight += 1
        try:
            async for r in self._generate(request):
                yield r
        finally:
            self.in_flight -= 1

    async def _generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        sampling = sampling_from_pb(request.params)
        ids = list(request.token_ids.ids) if request.HasField("token_ids") else self.codec.encode(request.text)
        self.codec.check(ids, self.cfg.engine.max_model_len, sampling.max_tokens)
        rid = request.request_id or uuid.uuid4().hex
        m = self.metrics
        async with self.manager.acquire(request.adapter) as lv:
            name, version = (lv.record.name, lv.record.version) if lv else ("", 0)
            label, status, generated = name or "base", "error", 0
            m.prompt_tokens.labels("grpc", label).inc(len(ids))
            try:
                async for d in self.engine.generate(ids, sampling, lv.handle if lv else None, rid,
                                                    priority=self.cfg.priority.users):
                    generated += len(d.token_ids)
                    yield pb.GenerateResponse(
                        index=d.index, token_ids=d.token_ids, text=d.text, logprobs=d.logprobs,
                        finished=d.finished, finish_reason=d.finish_reason, adapter_name=name,
                        adapter_version=version, prompt_tokens=len(ids),
                    )
                status = "ok"
            finally:
                m.generated_tokens.labels("grpc", label).inc(generated)
                m.requests.labels("grpc", "generate", label, status).inc()

    async def ListAdapters(self, request: pb.ListLoadedRequest, context) -> pb.ListLoadedResponse:
        return self._snapshot()

    async def WatchAdapters(self, request: pb.ListLoadedRequest, context) -> AsyncIterator[pb.ListLoadedResponse]:
        while True:
            changed = self.manager.changed()  # before the snapshot: no change slips in between
            yield self._snapshot()
            await changed.wait()

    def _snapshot(self) -> pb.ListLoadedResponse:
        m = self.manager
        return pb.ListLoadedResponse(
            adapters=[pb.LoadedAdapter(name=n, version=v, active_requests=lv.active,
                                       latest=m.latest.get(n) == v, followed=n in m.followed)
                      for (n, v), lv in sorted(m.loaded.items())],
            refused=[pb.RefusedAdapter(name=n, version=v, reason=r) for (n, v), r in sorted(m.refused.items())],
            base_model_fingerprint=m.base.fingerprint, max_lora_rank=m.base.max_lora_rank,
        )
