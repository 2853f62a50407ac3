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
import uuid

import grpc

from loraloop.v1 import learner_pb2 as lpb
from loraloop.v1 import learner_pb2_grpc as lpb_grpc
from loraloop.v1 import rollout_pb2 as rpb
from services.common.trajectories import (
    AcceptResult,
    AckCode,
    GroupSpec,
    Lease,
    SampleRecord,
    TrajectoryGroupRecord,
)
from services.rollout.adapters import AdapterManager
from services.rollout.config import RolloutConfig
from services.rollout.engine import Engine, SampleDelta
from services.rollout.requests import TokenCodec, sampling_from_pb
from services.rollout.rewards import load_reward_fn, score

log = logging.getLogger(__name__)
_RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


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
                leases = [Lease.from_pb(m, self.worker_id) for m in resp.leases]
                task = asyncio.create_task(self._process(stub, leases, sem))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    async def _process(self, stub, leases: list[Lease], sem: asyncio.Semaphore) -> None:
        try:
            groups = [g for lease in leases for g in await self.generate(lease)]
            await self.submit(stub, groups)
        except Exception:
            log.exception("lease failed; the learner will re-lease its groups after the deadline")
        finally:
            sem.release()

    async def generate(self, lease: Lease) -> list[TrajectoryGroupRecord]:
        params = lease.sampling if lease.sampling is not None else rpb.SamplingParams()
        sampling = dataclasses.replace(sampling_from_pb(params), logprobs=True)
        fn = self._reward_fns.get(lease.reward_fn) or load_reward_fn(lease.reward_fn or "arithmetic")
        self._reward_fns[lease.reward_fn] = fn
        if lease.adapter_name and lease.min_version:
            await self.manager.wait_for(lease.adapter_name, lease.min_version, lease.deadline)
        selector = f"{lease.adapter_name}@latest" if lease.adapter_name else ""
        async with self.manager.acquire(selector) as lv:
            version = lv.record.version if lv else 0

            async def one(g: GroupSpec) -> TrajectoryGroupRecord:
                ids = list(g.prompt_token_ids) or self.codec.encode(g.prompt_text)
                self.codec.check(ids, self.cfg.engine.max_model_len, sampling.max_tokens)
                outs: list[SampleDelta] = [
                    d async for d in self.engine.generate(ids, sampling, lv.handle if lv else None,
                                                          f"{g.group_id}-{uuid.uuid4().hex[:8]}", stream=False)
                ]
                samples = []
                for d in sorted(outs, key=lambda d: d.index):
                    r = score(fn, g.data_source, d.text, g.ground_truth, g.extra_info)
                    samples.append(SampleRecord(
                        response_token_ids=tuple(d.token_ids), logprobs=tuple(d.logprobs), reward=r.score,
                        adapter_version=version, finish_reason=d.finish_reason,
                        reward_details_json=json.dumps(r.details), reward_error=r.error or "",
                    ))
                return TrajectoryGroupRecord(lease_id=lease.lease_id, group_id=g.group_id,
                                             prompt_token_ids=tuple(ids), adapter_name=lease.adapter_name,
                                             samples=tuple(samples))

            return list(await asyncio.gather(*(one(g) for g in lease.groups)))

    async def submit(self, stub, groups: list[TrajectoryGroupRecord]) -> None:
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
                    await call.write(g.to_pb())
                await call.done_writing()
                async for msg in call:
                    ack = AcceptResult.from_pb(msg)
                    if pending.pop(ack.group_id, None) is None:
                        continue
                    if ack.status.delivered:
                        self.stats["groups_submitted"] += ack.status is AckCode.OK
                    else:
                        self.stats["groups_refused"] += 1
                        log.warning("learner refused group %s: %s %s", ack.group_id, ack.status.name, ack.message)
            except grpc.aio.AioRpcError as e:
                if e.code() not in _RETRY:
                    log.error("submit failed: %s %s; %d groups left to the learner's re-lease",
                              e.code().name, e.details(), len(pending))
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
