"""The Learner gRPC service (rank 0): rollout servers lease prompt groups and submit
trajectories. It runs on its own thread and event loop beside the training loop; the two
share the LeaseTable under one lock."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable

from loraloop.v1 import learner_pb2 as pb
from loraloop.v1 import learner_pb2_grpc as pb_grpc
from loraloop.v1 import rollout_pb2 as rpb
from services.common.grpc_server import Registration, serve
from services.learner.config import LearnerConfig
from services.learner.leases import LeaseTable, TrajectoryGroupRecord

log = logging.getLogger(__name__)
SERVICE = "loraloop.v1.Learner"
ROLES_OF_METHOD = {f"/{SERVICE}/LeasePrompts": frozenset({"rollout", "learner"}),
                   f"/{SERVICE}/SubmitTrajectories": frozenset({"rollout", "learner"})}


class LearnerServicer(pb_grpc.LearnerServicer):
    def __init__(self, table: LeaseTable, lock: threading.Lock, sampling: rpb.SamplingParams, reward_fn: str,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.table, self.lock, self.sampling, self.reward_fn = table, lock, sampling, reward_fn
        self.on_change = on_change
        self.finished = False

    async def LeasePrompts(self, request: pb.LeaseRequest, context) -> pb.LeaseResponse:
        if self.finished:
            return pb.LeaseResponse(finished=True)
        with self.lock:
            lease = self.table.lease(request.worker_id or "anonymous", request.max_groups)
            refusal = self.table.last_refusal
        if lease is None:
            return refusal.to_pb() if refusal else pb.LeaseResponse(retry_after_ms=200)
        self.on_change()
        return pb.LeaseResponse(leases=[lease.to_pb(self.sampling, self.reward_fn)])

    async def SubmitTrajectories(self, request_iterator: AsyncIterator[pb.TrajectoryGroup],
                                 context) -> AsyncIterator[pb.SubmitAck]:
        async for group in request_iterator:
            try:
                record = TrajectoryGroupRecord.from_pb(group)
            except (ValueError, TypeError) as e:
                yield pb.SubmitAck(group_id=group.group_id, code=3, message=f"malformed group: {e}")
                continue
            with self.lock:
                result = self.table.accept(record)
            if result.status != 0:
                log.info("group %s refused: %s", group.group_id, result.message)
            self.on_change()
            yield result.to_pb()


class LearnerService:
    """Starts the gRPC server on a background thread; `stop()` ends it."""

    def __init__(self, cfg: LearnerConfig, servicer: LearnerServicer) -> None:
        self.cfg, self.servicer = cfg, servicer
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="learner-grpc", daemon=True)
        self._error: BaseException | None = None

    def start(self, timeout_s: float = 30.0) -> int:
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._error:
            raise RuntimeError(f"learner gRPC server did not start: {self._error}")
        return self.port

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def started(port: int) -> None:
                self.port = port
                self._ready.set()

            await serve([Registration(pb_grpc.add_LearnerServicer_to_server, self.servicer, SERVICE)],
                        self.cfg.server, self.cfg.auth, self.cfg.tls, ROLES_OF_METHOD, on_started=started,
                        stop_event=self._stop)

        try:
            asyncio.run(main())
        except BaseException as e:  # surfaced by start()
            self._error = e
            self._ready.set()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)
