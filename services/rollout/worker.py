"""The training loop inside a rollout server: lease prompt groups from the learner, sample
`n` responses per prompt with the lease's adapter at its latest version, score them, and
stream the trajectories back.

Several runs on one replica: one worker per learner, all sharing the replica's
`leases_in_flight` through `WeightedSlots` (each learner's share in proportion to its weight
while several want more; one alone may use them all). A worker submits only to the learner
it leased from, and each lease names its run's adapter, so versions and trajectories never
cross runs (the learner also refuses a group of another adapter).

Delivery: a group is re-sent until the learner acknowledges it (OK, or ALREADY_EXISTS when
an earlier send got through but its ack was lost), so a learner restart loses nothing; the
learner accepts a group id once, so nothing is accepted twice. Groups the learner refuses
(invalid, too stale, lease expired) are logged and counted, never silently dropped.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import time
import uuid

import grpc

from loraloop.v1 import learner_pb2 as lpb
from loraloop.v1 import learner_pb2_grpc as lpb_grpc
from loraloop.v1 import rollout_pb2 as rpb
from services.common.config import ClientTLSConfig
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
from services.rollout.metrics import RolloutMetrics
from services.rollout.requests import TokenCodec, sampling_from_pb
from services.rollout.rewards import load_reward_fn, score

log = logging.getLogger(__name__)
_RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class WeightedSlots:
    """`total` slots shared by keys in proportion to their weights, work-conserving: a free slot
    goes to the waiting key holding the fewest slots per unit of weight (ties: the key named
    first). Nobody is preempted; a key alone may hold every slot."""

    def __init__(self, total: int, weights: dict[str, float]) -> None:
        if total < 1 or not weights or min(weights.values()) <= 0:
            raise ValueError("WeightedSlots needs total >= 1 and positive weights")
        self.total, self.weights = total, dict(weights)
        self.order = {k: i for i, k in enumerate(weights)}
        self.held = dict.fromkeys(weights, 0)
        self.granted = dict.fromkeys(weights, 0)
        self._waiting: dict[str, collections.deque[asyncio.Future]] = {k: collections.deque() for k in weights}

    @property
    def free(self) -> int:
        return self.total - sum(self.held.values())

    def _dispatch(self) -> None:
        while self.free > 0:
            for q in self._waiting.values():
                while q and q[0].done():  # cancelled while waiting
                    q.popleft()
            keys = [k for k, q in self._waiting.items() if q]
            if not keys:
                return
            k = min(keys, key=lambda k: (self.held[k] / self.weights[k], self.order[k]))
            self.held[k] += 1
            self.granted[k] += 1
            self._waiting[k].popleft().set_result(None)

    async def acquire(self, key: str) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiting[key].append(fut)
        self._dispatch()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted as we were cancelled: give it back
                self.release(key)
            raise

    def release(self, key: str) -> None:
        if self.held[key] <= 0:
            raise RuntimeError(f"release without acquire ({key})")
        self.held[key] -= 1
        self._dispatch()


async def run_workers(cfg: RolloutConfig, engine: Engine, manager: AdapterManager, codec: TokenCodec,
                      token: str | None, worker_id: str, metrics: RolloutMetrics | None = None) -> None:
    """One worker per learner in `cfg.learner_targets()`, sharing the replica's leases in flight
    by weight; returns when every learner has said training is finished."""
    targets = cfg.learner_targets()
    slots = WeightedSlots(cfg.leases_in_flight, {t.address: t.weight for t in targets})
    metrics = metrics or RolloutMetrics()
    metrics.priority.labels("training").set(cfg.priority.training)
    for t in targets:
        metrics.lease_weight.labels(t.address).set(t.weight)
        metrics.lease_slots.labels(t.address).set_function(lambda a=t.address: slots.held[a])
    workers = [RolloutWorker(cfg, engine, manager, codec, token, worker_id, learner=t.address, slots=slots,
                             metrics=metrics) for t in targets]
    await asyncio.gather(*(w.run() for w in workers))


class RolloutWorker:
    def __init__(self, cfg: RolloutConfig, engine: Engine, manager: AdapterManager, codec: TokenCodec,
                 token: str | None, worker_id: str, learner: str = "", slots: WeightedSlots | None = None,
                 metrics: RolloutMetrics | None = None) -> None:
        self.cfg, self.engine, self.manager, self.codec = cfg, engine, manager, codec
        self.worker_id = worker_id
        self.learner = learner or (cfg.learner if cfg is not None else "")
        self.slots = slots
        self.metrics = metrics or RolloutMetrics()
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._reward_fns: dict[str, object] = {}
        self.stats = {"groups_submitted": 0, "groups_refused": 0, "resubmits": 0}

    async def run(self) -> None:
        if self.slots is None:
            self.slots = WeightedSlots(self.cfg.leases_in_flight, {self.learner: 1.0})
        try:
            await self._run()
        finally:
            log.info("rollout worker done: %s", json.dumps({"learner": self.learner, **self.stats}))

    def _lease_wait_ms(self) -> int:
        return self.cfg.lease_wait_ms if self.cfg is not None else 0

    async def _run(self) -> None:
        slots, me = self.slots, self.learner
        assert slots is not None
        tls = self.cfg.client_tls if self.cfg is not None else ClientTLSConfig()
        async with tls.channel(me, aio=True) as channel:
            stub = lpb_grpc.LearnerStub(channel)
            tasks: set[asyncio.Task] = set()
            delay = 0.2
            while True:
                await slots.acquire(me)
                asked = time.monotonic()
                try:
                    resp = await stub.LeasePrompts(
                        lpb.LeaseRequest(worker_id=self.worker_id, max_groups=8, wait_ms=self._lease_wait_ms()),
                        timeout=30, metadata=self.metadata)
                except grpc.aio.AioRpcError as e:
                    slots.release(me)
                    if e.code() not in _RETRY:
                        log.error("lease from %s refused: %s %s", me, e.code().name, e.details())
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                except BaseException:
                    slots.release(me)
                    raise
                delay = 0.2
                if resp.finished:
                    slots.release(me)
                    log.info("learner %s says training is finished; %s", me, self.stats)
                    await asyncio.gather(*tasks)
                    return
                if not resp.leases:
                    slots.release(me)
                    # retry_after counts from the question: after a long poll that ran its
                    # course, ask again at once (a learner without long polls answers at once,
                    # and is asked again after its retry_after, as before).
                    waited = time.monotonic() - asked
                    await asyncio.sleep(max(max(resp.retry_after_ms, 50) / 1000 - waited, 0.0))
                    continue
                leases = [Lease.from_pb(m, self.worker_id) for m in resp.leases]
                for lease in leases:
                    self.metrics.leases.labels(me, lease.adapter_name or "base").inc()
                task = asyncio.create_task(self._process(stub, leases))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    async def _process(self, stub, leases: list[Lease]) -> None:
        try:
            groups = [g for lease in leases for g in await self.generate(lease)]
            await self.submit(stub, groups)
        except Exception:
            log.exception("lease from %s failed; the learner will re-lease its groups after the deadline",
                          self.learner)
        finally:
            assert self.slots is not None
            self.slots.release(self.learner)

    async def generate(self, lease: Lease) -> list[TrajectoryGroupRecord]:
        params = lease.sampling if lease.sampling is not None else rpb.SamplingParams()
        # No text while generating: each sample's ids are decoded once below (the reward reads the
        # text), and vLLM skips decoding every log-prob's token to a string (issue 17: ~a tenth of
        # the replica's front-process CPU on the demo batch, which shares the learner's cores).
        sampling = dataclasses.replace(sampling_from_pb(params), logprobs=True, detokenize=False)
        fn = self._reward_fns.get(lease.reward_fn) or load_reward_fn(lease.reward_fn or "arithmetic")
        self._reward_fns[lease.reward_fn] = fn
        if lease.adapter_name and lease.min_version:
            await self.manager.wait_for(lease.adapter_name, lease.min_version, lease.deadline)
        selector = f"{lease.adapter_name}@latest" if lease.adapter_name else ""
        m, label = self.metrics, lease.adapter_name or "base"
        async with self.manager.acquire(selector) as lv:
            version = lv.record.version if lv else 0

            async def one(g: GroupSpec) -> TrajectoryGroupRecord:
                ids = list(g.prompt_token_ids) or self.codec.encode(g.prompt_text)
                self.codec.check(ids, self.cfg.engine.max_model_len, sampling.max_tokens)
                t0 = time.perf_counter()
                status = "error"
                try:
                    outs: list[SampleDelta] = [
                        d async for d in self.engine.generate(ids, sampling, lv.handle if lv else None,
                                                              f"{g.group_id}-{uuid.uuid4().hex[:8]}", stream=False,
                                                              priority=self.cfg.priority.training)
                    ]
                    status = "ok"
                finally:
                    m.requests.labels("training", "lease", label, status).inc()
                    m.duration.labels("training", "lease").observe(time.perf_counter() - t0)
                m.prompt_tokens.labels("training", label).inc(len(ids))
                m.generated_tokens.labels("training", label).inc(sum(len(d.token_ids) for d in outs))
                samples = []
                for d in sorted(outs, key=lambda d: d.index):
                    text = d.text if sampling.makes_text else self.codec.decode(d.token_ids, ids)
                    r = score(fn, g.data_source, text, g.ground_truth, g.extra_info)
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
                    sent = pending.pop(ack.group_id, None)
                    if sent is None:
                        continue
                    self.metrics.groups.labels(self.learner, sent.adapter_name or "base",
                                               ack.status.name.lower()).inc()
                    if ack.status.delivered:
                        self.stats["groups_submitted"] += ack.status is AckCode.OK
                    else:
                        self.stats["groups_refused"] += 1
                        log.warning("learner refused group %s: %s %s", ack.group_id, ack.status.name, ack.message)
            except grpc.aio.AioRpcError as e:
                if e.code() not in _RETRY:
                    log.error("submit to %s failed: %s %s; %d groups left to the learner's re-lease",
                              self.learner, e.code().name, e.details(), len(pending))
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
