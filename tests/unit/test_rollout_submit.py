"""RolloutWorker.submit against a scripted learner stub: a group is re-sent until the learner
acknowledges it, and only those not acknowledged yet; ALREADY_EXISTS (an earlier send got
through, its ack was lost) counts as delivered; refusals are counted, not re-sent."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from loraloop.v1 import learner_pb2 as lpb
from services.common.trajectories import AckCode, SampleRecord, TrajectoryGroupRecord
from services.rollout.worker import RolloutWorker


def group(gid: str) -> TrajectoryGroupRecord:
    return TrajectoryGroupRecord("lease-1", gid, (1, 2), "p", (SampleRecord((3,), (-0.5,), 1.0, 1),))


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=code.name)


class ScriptedCall:
    """One SubmitTrajectories stream: records what was written, then answers per `script`:
    a list of (group_id, AckCode) acks, optionally ending in an AioRpcError (the stream broke)."""

    def __init__(self, script: list) -> None:
        self.script, self.written = script, []

    async def write(self, msg: lpb.TrajectoryGroup) -> None:
        self.written.append(msg)

    async def done_writing(self) -> None:
        pass

    def __aiter__(self):
        return self._answers()

    async def _answers(self):
        for item in self.script:
            await asyncio.sleep(0)
            if isinstance(item, BaseException):
                raise item
            gid, code = item
            yield lpb.SubmitAck(group_id=gid, code=int(code), message=code.name.lower())


class ScriptedLearner:
    def __init__(self, *scripts: list) -> None:
        self.scripts, self.calls = list(scripts), []

    def SubmitTrajectories(self, timeout: float, metadata: tuple) -> ScriptedCall:
        call = ScriptedCall(self.scripts.pop(0))
        self.calls.append(call)
        return call


def worker() -> RolloutWorker:
    return RolloutWorker(cfg=None, engine=None, manager=None, codec=None, token="t", worker_id="w")  # type: ignore[arg-type]


def sent(call: ScriptedCall) -> list[str]:
    return [m.group_id for m in call.written]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    real_sleep = asyncio.sleep
    monkeypatch.setattr(asyncio, "sleep", lambda s, *a: real_sleep(0))


def test_only_unacknowledged_groups_are_sent_again():
    learner = ScriptedLearner(
        [("a", AckCode.OK), rpc_error(grpc.StatusCode.UNAVAILABLE)],  # learner restarted after acking a
        [("c", AckCode.OK), ("b", AckCode.ALREADY_EXISTS)],  # b got through before; its ack was lost
    )
    w = worker()
    asyncio.run(w.submit(learner, [group("a"), group("b"), group("c")]))
    assert [sent(c) for c in learner.calls] == [["a", "b", "c"], ["b", "c"]]
    assert w.stats == {"groups_submitted": 2, "groups_refused": 0, "resubmits": 1}  # b delivered, not counted twice
    assert learner.calls[0].written[0] == group("a").to_pb()  # the records go out as they were built


def test_a_group_acked_already_exists_first_time_is_delivered_not_refused():
    learner = ScriptedLearner([("a", AckCode.ALREADY_EXISTS), ("b", AckCode.OK)])
    w = worker()
    asyncio.run(w.submit(learner, [group("a"), group("b")]))
    assert len(learner.calls) == 1
    assert w.stats == {"groups_submitted": 1, "groups_refused": 0, "resubmits": 0}


def test_refused_groups_are_counted_and_not_sent_again():
    learner = ScriptedLearner(
        [("a", AckCode.FAILED_PRECONDITION), ("b", AckCode.INVALID_ARGUMENT), ("zz", AckCode.OK),  # zz: not ours
         rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED)],
        [("c", AckCode.OK)],
    )
    w = worker()
    asyncio.run(w.submit(learner, [group("a"), group("b"), group("c")]))
    assert [sent(c) for c in learner.calls] == [["a", "b", "c"], ["c"]]
    assert w.stats == {"groups_submitted": 1, "groups_refused": 2, "resubmits": 1}


def test_a_permanent_error_leaves_the_rest_to_the_learners_re_lease():
    learner = ScriptedLearner([("a", AckCode.OK), rpc_error(grpc.StatusCode.PERMISSION_DENIED)])
    w = worker()
    asyncio.run(w.submit(learner, [group("a"), group("b")]))
    assert len(learner.calls) == 1  # not retried: the learner leases b again after its deadline
    assert w.stats == {"groups_submitted": 1, "groups_refused": 0, "resubmits": 0}
