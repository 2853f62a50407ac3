"""The Learner gRPC service (rank 0): rollout servers lease prompt groups and submit
trajectories. It runs on its own thread and event loop beside the training loop; the two
share the LeaseTable, which keeps its own lock."""

from __future__ import annotations

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
        self.finished = False

    async def LeasePrompts(self, request: pb.LeaseRequest, context) -> pb.LeaseResponse:
        if self.finished:
            return pb.LeaseResponse(finished=True)
        if self.validator is not None:
            val = self.validator.lease(request.worker_id or "anonymous", request.max_groups)
            if val is not None:
                lease, sampling = val
                return pb.LeaseResponse(leases=[lease.to_pb(sampling, self.reward_fn)])
        answer = self.table.lease(request.worker_id or "anonymous", request.max_groups)
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
