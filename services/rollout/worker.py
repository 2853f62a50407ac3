"""The training loop inside a rollout server: lease prompt groups from the learner, sample
`n` responses per prompt with the lease's adapter at its latest version, score them, and
stream the trajectories back.

Delivery: a group is re-sent until the learner acknowledges it (OK, or ALREADY_EXISTS when
an earlier send got through but its ack was lost), so a learner restart loses nothing; the
learner accepts a group id once, so nothing is accepted twice. Groups the learner refuses
(invalid, too stale, lease expired) are logged and counted, never silently dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid

import grpc

from loraloop.v1 import learner_pb2 as lpb
from loraloop.v1 import learner_pb2_grpc as lpb_grpc
from services.rollout.adapters import AdapterManager
from services.rollout.config import RolloutConfig
from services.rollout.engine import Engine, SampleDelta
from services.rollout.rewards import load_reward_fn, score
from services.rollout.service import TokenCodec, sampling_from_pb

log = logging.getLogger(__name__)
_RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
OK, ALREADY_EXISTS = 0, 6


class RolloutWorker:
    def __init__(self, cfg: RolloutConfig, engine: Engine, manager: AdapterManager, codec: TokenCodec,
                 token: str | None, worker_id: str) -> None:
        self.cfg, self.engine, self.manager, self.codec = cfg, engine, manager, codec
        self.worker_id = worker_id
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._reward_fns: dict[str, object] = {}
        self.stats = {"groups_submitted": 0, "groups_refused": 0, "resubmits": 0}

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            log.info("rollout worker done: %s", json.dumps(self.stats))

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.cfg.learner) as channel:
            stub = lpb_grpc.LearnerStub(channel)
            sem = asyncio.Semaphore(self.cfg.leases_in_flight)
            tasks: set[asyncio.Task] = set()
            delay = 0.2
            while True:
                await sem.acquire()
                try:
                    resp = await stub.LeasePrompts(lpb.LeaseRequest(worker_id=self.worker_id, max_groups=8),
                                                   timeout=30, metadata=self.metadata)
                except grpc.aio.AioRpcError as e:
                    sem.release()
                    if e.code() not in _RETRY:
                        log.error("lease refused: %s %s", e.code().name, e.details())
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                delay = 0.2
                if resp.finished:
                    sem.release()
                    log.info("learner says training is finished; %s", self.stats)
                    await asyncio.gather(*tasks)
                    return
                if not resp.leases:
                    sem.release()
                    await asyncio.sleep(max(resp.retry_after_ms, 50) / 1000)
                    continue
                task = asyncio.create_task(self._process(stub, list(resp.leases), sem))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    async def _process(self, stub, leases: list[lpb.Lease], sem: asyncio.Semaphore) -> None:
        try:
            groups = [g for lease in leases for g in await self.generate(lease)]
            await self.submit(stub, groups)
        except Exception:
            log.exception("lease failed; the learner will re-lease its groups after the deadline")
        finally:
            sem.release()

    async def _adapter_at_least(self, name: str, min_version: int, deadline_ms: int) -> None:
        while self.manager.latest.get(name, 0) < min_version:
            if time.time() * 1000 > deadline_ms:
                raise TimeoutError(f"{name}@v{min_version} did not arrive before the lease deadline")
            await asyncio.sleep(0.02)

    async def generate(self, lease: lpb.Lease) -> list[lpb.TrajectoryGroup]:
        sampling = sampling_from_pb(lease.sampling, 64)
        sampling = dataclasses.replace(sampling, logprobs=True)
        fn = self._reward_fns.get(lease.reward_fn) or load_reward_fn(lease.reward_fn or "arithmetic")
        self._reward_fns[lease.reward_fn] = fn
        if lease.adapter_name and lease.min_version:
            if self.manager.latest.get(lease.adapter_name) is None:
                async with self.manager.acquire(f"{lease.adapter_name}@latest"):
                    pass  # first use: load and follow
            await self._adapter_at_least(lease.adapter_name, lease.min_version, lease.deadline_ms)
        selector = f"{lease.adapter_name}@latest" if lease.adapter_name else ""
        async with self.manager.acquire(selector) as lv:
            version = lv.record.version if lv else 0

            async def one(g: lpb.PromptGroup) -> lpb.TrajectoryGroup:
                ids = list(g.prompt_token_ids) or self.codec.encode(g.prompt_text)
                self.codec.check(ids, self.cfg.engine.max_model_len, sampling.max_tokens)
                outs: list[SampleDelta] = [
                    d async for d in self.engine.generate(ids, sampling, lv.handle if lv else None,
                                                          f"{g.group_id}-{uuid.uuid4().hex[:8]}", stream=False)
                ]
                extra = json.loads(g.extra_info_json) if g.extra_info_json else None
                samples = []
                for d in sorted(outs, key=lambda d: d.index):
                    r = score(fn, g.data_source, d.text, g.ground_truth, extra)
                    samples.append(lpb.Sample(
                        response_token_ids=d.token_ids, logprobs=d.logprobs, reward=r.score,
                        reward_details_json=json.dumps(r.details), finish_reason=d.finish_reason,
                        adapter_version=version, reward_error=r.error or "",
                    ))
                return lpb.TrajectoryGroup(lease_id=lease.lease_id, group_id=g.group_id, prompt_token_ids=ids,
                                           adapter_name=lease.adapter_name, samples=samples)

            return list(await asyncio.gather(*(one(g) for g in lease.groups)))

    async def submit(self, stub, groups: list[lpb.TrajectoryGroup]) -> None:
        """Send until every group is acknowledged; re-send only what was not."""
        pending = {g.group_id: g for g in groups}
        delay = 0.2
        first = True
        while pending:
            if not first:
                self.stats["resubmits"] += 1
            first = False
            try:
                call = stub.SubmitTrajectories(timeout=60, metadata=self.metadata)
                for g in list(pending.values()):
                    await call.write(g)
                await call.done_writing()
                async for ack in call:
                    g = pending.pop(ack.group_id, None)
                    if g is None:
                        continue
                    if ack.code in (OK, ALREADY_EXISTS):
                        self.stats["groups_submitted"] += ack.code == OK
                    else:
                        self.stats["groups_refused"] += 1
                        log.warning("learner refused group %s: code %d %s", ack.group_id, ack.code, ack.message)
            except grpc.aio.AioRpcError as e:
                if e.code() not in _RETRY:
                    log.error("submit failed: %s %s; %d groups left to the learner's re-lease",
                              e.code().name, e.details(), len(pending))
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
