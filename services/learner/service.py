"""The Learner gRPC service (rank 0): rollout servers lease prompt groups and submit
trajectories. It runs on its own thread and event loop beside the training loop; the two
share the LeaseTable, which keeps its own lock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from loraloop.v1 import learner_pb2 as pb
from loraloop.v1 import learner_pb2_grpc as pb_grpc
from loraloop.v1 import rollout_pb2 as rpb
from services.common.trajectories import AcceptResult, AckCode, Lease, TrajectoryGroupRecord
from services.learner.leases import LeaseTable
from services.learner.validation import Validator

log = logging.getLogger(__name__)
SERVICE = "loraloop.v1.Learner"
# The longest a LeasePrompts with nothing to hand out is held (LeaseRequest.wait_ms asks for
# up to this), and how often a held one looks again for leases whose deadline passed (no
# event marks that).
MAX_LEASE_WAIT_S = 5.0
_RECHECK_S = 0.25
ROLES_OF_METHOD = {f"/{SERVICE}/LeasePrompts": frozenset({"rollout", "learner"}),
                   f"/{SERVICE}/SubmitTrajectories": frozenset({"rollout", "learner"})}


class LearnerServicer(pb_grpc.LearnerServicer):
    def __init__(self, table: LeaseTable, sampling: rpb.SamplingParams, reward_fn: str,
                 on_change: Callable[[], None] = lambda: None, validator: Validator | None = None) -> None:
        """With a `validator`, a validation round's groups are leased first, and groups with its
        id prefix are handed to it instead of the training table."""
        self.table, self.sampling, self.reward_fn = table, sampling, reward_fn
        self.on_change = on_change
        self.validator = validator
        self._finished = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()  # set, then replaced, at every change: see notify()
        table.subscribe(self.notify)

    @property
    def finished(self) -> bool:
        return self._finished

    @finished.setter
    def finished(self, value: bool) -> None:
        self._finished = value
        self.notify()

    def notify(self) -> None:
        """Something changed that may let a waiting LeasePrompts through (the table, a
        validation round, the end of training). Any thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed since: nobody is waiting any more
                loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def LeasePrompts(self, request: pb.LeaseRequest, context) -> pb.LeaseResponse:
        """Leases, or with none to hand out, a refusal after up to `request.wait_ms` (a long
        poll: the answer comes as soon as the table changes and a lease is possible)."""
        loop = self._loop = asyncio.get_running_loop()
        wait_s = min(request.wait_ms / 1000, MAX_LEASE_WAIT_S)
        left = context.time_remaining() if context is not None else None
        if left is not None:  # answer before the caller's deadline, with room for the reply
            wait_s = min(wait_s, max(0.0, left - 1.0))
        until = loop.time() + wait_s
        while True:
            changed = self._changed  # taken before looking: a change after the look sets it
            last = loop.time() >= until
            answer = self._lease_once(request, count_refusal=last)
            if answer.leases or answer.finished or last:
                return answer
            now = loop.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(until - now, _RECHECK_S))

    def _lease_once(self, request: pb.LeaseRequest, count_refusal: bool) -> pb.LeaseResponse:
        if self.finished:
            return pb.LeaseResponse(finished=True)
        if self.validator is not None:
            val = self.validator.lease(request.worker_id or "anonymous", request.max_groups)
            if val is not None:
                lease, sampling = val
                return pb.LeaseResponse(leases=[lease.to_pb(sampling, self.reward_fn)])
        answer = self.table.lease(request.worker_id or "anonymous", request.max_groups,
                                  count_refusal=count_refusal)
        if not isinstance(answer, Lease):
            return answer.to_pb()
        self.on_change()
        return pb.LeaseResponse(leases=[answer.to_pb(self.sampling, self.reward_fn)])

    async def SubmitTrajectories(self, request_iterator: AsyncIterator[pb.TrajectoryGroup],
                                 context) -> AsyncIterator[pb.SubmitAck]:
        async for group in request_iterator:
            try:
                record = TrajectoryGroupRecord.from_pb(group)
            except (ValueError, TypeError) as e:
                yield AcceptResult(group.group_id, AckCode.INVALID_ARGUMENT, f"malformed group: {e}").to_pb()
                continue
            if self.validator is not None and self.validator.owns(record.group_id):
                result = self.validator.accept(record, self.table.version)
            else:
                result = self.table.accept(record)
            if result.status is not AckCode.OK:
                log.info("group %s refused: %s", group.group_id, result.message)
            self.on_change()
            yield result.to_pb()
