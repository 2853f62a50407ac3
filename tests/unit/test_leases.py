"""LeaseTable rules without gRPC: re-lease after the deadline, accept-once across re-leases,
the staleness bound (max_staleness=0 is synchronous), backpressure, every validation failure
with its status, counters, and checkpoints that resume to the same next batch."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from loraloop.v1 import learner_pb2 as pb
from loraloop.v1 import rollout_pb2 as rpb
from services.common.trajectories import (
    AckCode,
    GroupSpec,
    Lease,
    Refusal,
    RefusalReason,
    SampleRecord,
    TrajectoryGroupRecord,
)
from services.learner.leases import LeaseTable

N, VOCAB, ADAPTER = 3, 15, "arith"


def make_table(**kw) -> LeaseTable:
    args = dict(adapter_name=ADAPTER, samples_per_group=N, groups_per_batch=2, vocab_size=VOCAB,
                max_staleness=1, max_buffered=100, lease_timeout_s=10.0, current_version=1,
                clock=lambda: pytest.fail("tests pass `now` explicitly"), id_prefix="t")
    args.update(kw)
    return LeaseTable(**args)


def fill(table: LeaseTable, k: int) -> list[GroupSpec]:
    start = table._seq
    return [table.add(f"p{start + i}", [1, 3 + i % 10, 13, 4, 14], f"{i}+1=", "arithmetic", "0" + str(i))
            for i in range(k)]


def result(lease: Lease, spec: GroupSpec, version: int = 1, **sample_changes) -> TrajectoryGroupRecord:
    samples = tuple(dataclasses.replace(SampleRecord((5, 6, 2), (-0.5, -1.25, -0.125), 1.0, version,
                                                     "stop", '{"acc": 1}'), **sample_changes)
                    for _ in range(N))
    return TrajectoryGroupRecord(lease.lease_id, spec.group_id, spec.prompt_token_ids, ADAPTER, samples)


def ids(lease: Lease | Refusal) -> list[str]:
    assert isinstance(lease, Lease), lease
    return [g.group_id for g in lease.groups]


def refusal(answer: Lease | Refusal) -> Refusal:
    assert isinstance(answer, Refusal), answer
    return answer


# ---------------------------------------------------------------------------- leasing


def test_lease_carries_groups_deadline_adapter_and_min_version() -> None:
    t = make_table(current_version=4)
    specs = fill(t, 3)
    assert [s.group_id for s in specs] == ["p0:1", "p1:2", "p2:3"]
    lease = t.lease("w1", max_groups=2, now=100.0)
    assert ids(lease) == ["p0:1", "p1:2"]
    assert (lease.worker_id, lease.adapter_name, lease.min_version, lease.deadline, lease.n) == ("w1", ADAPTER, 4, 110.0, N)
    m = lease.to_pb(rpb.SamplingParams(n=99, temperature=0.7, max_tokens=3), reward_fn="arithmetic")
    assert (m.lease_id, m.adapter_name, m.min_version, m.deadline_ms, m.reward_fn) == (lease.lease_id, ADAPTER, 4, 110_000, "arithmetic")
    assert m.sampling.n == N and m.sampling.max_tokens == 3 and m.sampling.temperature == pytest.approx(0.7)
    assert [GroupSpec.from_pb(g) for g in m.groups] == list(lease.groups)
    assert t.lease("w2", now=100.0).groups == (specs[2],)


def test_expired_groups_are_leased_again_first() -> None:
    t = make_table()
    fill(t, 2)
    first = t.lease("w1", max_groups=1, now=0.0)
    assert ids(first) == ["p0:1"]
    assert ids(t.lease("w2", max_groups=1, now=5.0)) == ["p1:2"]
    assert refusal(t.lease("w3", now=9.9)).reason is RefusalReason.NOTHING_PENDING
    again = t.lease("w3", now=10.0)  # p0's deadline passed, p1's (15.0) not yet
    assert ids(again) == ["p0:1"] and again.lease_id != first.lease_id
    assert t.stats()["groups_leased_again"] == 1 and t.stats()["groups_leased"] == 3


@pytest.mark.parametrize("order", ["old_lease_first", "new_lease_first"])
def test_a_group_is_accepted_once_across_re_leases(order: str) -> None:
    t = make_table()
    (spec,) = fill(t, 1)
    old = t.lease("w1", now=0.0)
    new = t.lease("w2", now=11.0)
    assert ids(new) == [spec.group_id]
    submissions = [result(old, spec), result(new, spec)]
    if order == "new_lease_first":
        submissions.reverse()
    statuses = [t.accept(g, now=12.0).status for g in submissions]
    assert statuses == [AckCode.OK, AckCode.ALREADY_EXISTS]
    assert t.accept(submissions[0], now=12.0).status is AckCode.ALREADY_EXISTS
    assert t.take_batch(1) == [submissions[0]]
    assert t.take_batch(1) is None
    s = t.stats()
    assert (s["accepted"], s["already_exists"], s["accepted_late"]) == (1, 2, int(order == "old_lease_first"))
    assert isinstance(t.lease("w3", now=100.0), Refusal)  # an accepted group is never leased again


def test_unknown_group_or_lease_is_failed_precondition() -> None:
    t = make_table()
    specs = fill(t, 2)
    lease_a = t.lease("w1", max_groups=1, now=0.0)
    lease_b = t.lease("w2", max_groups=1, now=0.0)
    ghost = dataclasses.replace(result(lease_a, specs[0]), group_id="nope:9")
    r = t.accept(ghost, now=1.0)
    assert (r.status, r.message) == (AckCode.FAILED_PRECONDITION, "unknown group id")
    r = t.accept(result(lease_b, specs[0]), now=1.0)  # p0 was never in lease_b
    assert r.status is AckCode.FAILED_PRECONDITION and "never leased under" in r.message
    assert t.stats()["failed_precondition"] == 2 and t.stats()["dropped_stale"] == 0
    assert t.accept(result(lease_a, specs[0]), now=1.0).status is AckCode.OK


# ---------------------------------------------------------------------------- staleness


def test_too_stale_groups_are_refused_counted_and_leased_again() -> None:
    t = make_table(max_staleness=1, current_version=1)
    (spec,) = fill(t, 1)
    lease = t.lease("w1", now=0.0)
    t.set_version(3)
    r = t.accept(result(lease, spec, version=1), now=1.0)  # 3 - 1 = 2 > 1
    assert r.status is AckCode.FAILED_PRECONDITION and "too stale" in r.message
    assert t.stats()["dropped_stale"] == 1 and t.stats()["failed_precondition"] == 1
    again = t.lease("w2", now=1.0)  # refused groups need not wait for their deadline
    assert ids(again) == [spec.group_id] and again.min_version == 3
    assert t.accept(result(again, spec, version=3), now=2.0).status is AckCode.OK


def test_samples_older_than_the_lease_min_version_are_refused() -> None:
    t = make_table(max_staleness=5, current_version=2)
    (spec,) = fill(t, 1)
    lease = t.lease("w1", now=0.0)
    r = t.accept(result(lease, spec, version=1), now=1.0)  # within max_staleness, below min_version
    assert r.status is AckCode.FAILED_PRECONDITION and "min_version 2" in r.message
    assert t.stats()["dropped_stale"] == 1


def test_staleness_within_the_bound_is_accepted() -> None:
    t = make_table(max_staleness=1, current_version=1)
    (spec,) = fill(t, 1)
    lease = t.lease("w1", now=0.0)
    t.set_version(2)
    assert t.accept(result(lease, spec, version=1), now=1.0).status is AckCode.OK


def test_buffered_groups_that_become_too_stale_are_dropped_and_requeued() -> None:
    t = make_table(max_staleness=1, groups_per_batch=1, current_version=1)
    specs = fill(t, 2)
    lease = t.lease("w1", now=0.0)
    assert [t.accept(result(lease, s, version=1), now=1.0).status for s in specs] == [AckCode.OK] * 2
    t.set_version(2)  # both still within 1 version
    assert t.stats()["buffered"] == 2
    t.set_version(3)
    assert t.stats()["buffered"] == 0 and t.stats()["dropped_stale_buffered"] == 2
    assert t.take_batch() is None
    # Same prompts, new group ids; the old ids stay accepted.
    requeued = t.lease("w2", now=2.0)
    assert ids(requeued) == ["p0:3", "p1:4"]
    assert [g.prompt_uid for g in requeued.groups] == ["p0", "p1"]
    assert requeued.groups[0].prompt_token_ids == specs[0].prompt_token_ids
    assert t.accept(result(lease, specs[0], version=1), now=2.0).status is AckCode.ALREADY_EXISTS
    with pytest.raises(ValueError, match="went back"):
        t.set_version(2)


def test_max_staleness_zero_is_synchronous() -> None:
    t = make_table(max_staleness=0, groups_per_batch=2, current_version=1)
    assert t.wanted() == 2
    fill(t, 3)
    assert t.wanted() == 0
    first = t.lease("w1", max_groups=8, now=0.0)
    assert ids(first) == ["p0:1", "p1:2"]  # one batch for version 1, no more
    assert refusal(t.lease("w2", now=0.0)).reason is RefusalReason.STALENESS
    for spec in first.groups:
        assert t.accept(result(first, spec, version=1), now=1.0).status is AckCode.OK
    assert refusal(t.lease("w2", now=1.0)).reason is RefusalReason.STALENESS
    assert len(t.take_batch()) == 2
    # Training on version 1 runs now: anything leased would be trained at version 2 or later.
    assert refusal(t.lease("w2", now=2.0)).reason is RefusalReason.STALENESS
    assert t.wanted() == 0
    t.set_version(2)
    assert t.wanted() == 1  # one prompt is still queued from before
    fill(t, 1)
    second = t.lease("w2", now=3.0)
    assert ids(second) == ["p2:3", "p3:4"] and second.min_version == 2
    assert t.accept(result(second, second.groups[0], version=1), now=3.0).status is AckCode.FAILED_PRECONDITION
    assert t.stats()["lease_refused_staleness"] == 3


def test_no_re_lease_once_the_versions_batches_are_taken() -> None:
    # A group leased after the trainer took its η+1 batches at V is trained at V+1 or later.
    t = make_table(max_staleness=0, groups_per_batch=2, current_version=1)
    specs = fill(t, 2)
    lease = t.lease("w1", now=0.0)
    t.accept(result(lease, specs[0]), now=1.0)
    assert len(t.take_batch(1)) == 1
    assert refusal(t.lease("w2", now=20.0)).reason is RefusalReason.STALENESS
    t.set_version(2)
    again = t.lease("w2", now=20.0)
    assert ids(again) == [specs[1].group_id] and again.min_version == 2


def test_max_staleness_one_leases_one_batch_ahead() -> None:
    t = make_table(max_staleness=1, groups_per_batch=2, current_version=1)
    assert t.wanted() == 4
    fill(t, 8)
    lease = t.lease("w1", max_groups=8, now=0.0)
    assert len(lease.groups) == 4  # (1 + 1) batches of 2
    for spec in lease.groups[:2]:
        t.accept(result(lease, spec, version=1), now=1.0)
    assert len(t.take_batch()) == 2
    # Two groups are still out and one batch was taken at v1: no room until v2.
    assert refusal(t.lease("w2", now=1.0)).reason is RefusalReason.STALENESS
    t.set_version(2)
    assert ids(t.lease("w2", max_groups=8, now=2.0)) == ["p4:5", "p5:6"]
    assert isinstance(t.lease("w3", now=2.0), Refusal)


def test_no_lease_before_the_first_adapter_version() -> None:
    t = make_table(current_version=0)
    fill(t, 1)
    r = refusal(t.lease("w1", now=0.0))
    assert r.reason is RefusalReason.NO_ADAPTER_VERSION
    assert r.to_pb() == pb.LeaseResponse(retry_after_ms=200)


# ---------------------------------------------------------------------------- backpressure


def test_full_buffer_refuses_leases_until_the_trainer_takes() -> None:
    t = make_table(max_staleness=10, max_buffered=1, retry_after_ms=750)
    specs = fill(t, 3)
    lease = t.lease("w1", max_groups=2, now=0.0)
    assert t.accept(result(lease, specs[0]), now=1.0).status is AckCode.OK
    r = refusal(t.lease("w2", now=1.0))
    assert r.reason is RefusalReason.BACKPRESSURE and r.retry_after_ms == 750
    assert t.stats()["lease_refused_backpressure"] == 1
    assert t.take_batch(1) == [result(lease, specs[0])]
    assert ids(t.lease("w2", now=1.0)) == ["p2:3"]


def test_nothing_pending() -> None:
    t = make_table()
    assert refusal(t.lease("w1", now=0.0)).reason is RefusalReason.NOTHING_PENDING
    assert t.stats()["lease_refused_nothing_pending"] == 1


# ---------------------------------------------------------------------------- validation


def _samples(g: TrajectoryGroupRecord, i: int = 1, **changes) -> TrajectoryGroupRecord:
    samples = list(g.samples)
    samples[i] = dataclasses.replace(samples[i], **changes)
    return dataclasses.replace(g, samples=tuple(samples))


INVALID = {
    "logprobs_short": (lambda g: _samples(g, logprobs=(-0.5, -0.5)), "2 logprobs for 3 tokens"),
    "logprobs_long": (lambda g: _samples(g, logprobs=(-0.5,) * 4), "4 logprobs for 3 tokens"),
    "empty_response": (lambda g: _samples(g, response_token_ids=(), logprobs=()), "no response tokens"),
    "token_at_vocab_size": (lambda g: _samples(g, response_token_ids=(5, VOCAB, 2)), "outside [0, 15)"),
    "negative_token": (lambda g: _samples(g, response_token_ids=(5, -1, 2)), "outside [0, 15)"),
    "reward_nan": (lambda g: _samples(g, reward=math.nan), "reward nan not finite"),
    "reward_inf": (lambda g: _samples(g, reward=-math.inf), "reward -inf not finite"),
    "logprob_nan": (lambda g: _samples(g, logprobs=(-0.5, math.nan, -0.1)), "logprob not finite"),
    "version_from_future": (lambda g: _samples(g, adapter_version=3), "adapter version 3 unknown"),
    "version_zero_with_adapter": (lambda g: _samples(g, adapter_version=0), "adapter version 0 unknown"),
    "too_few_samples": (lambda g: dataclasses.replace(g, samples=g.samples[:-1]), "2 samples, expected 3"),
    "too_many_samples": (lambda g: dataclasses.replace(g, samples=g.samples * 2), "6 samples, expected 3"),
    "prompt_changed": (lambda g: dataclasses.replace(g, prompt_token_ids=(1, 3, 13, 4, 13)), "prompt token ids differ"),
    "other_adapter": (lambda g: dataclasses.replace(g, adapter_name="other"), "adapter 'other'"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_groups_are_refused_and_counted(case: str) -> None:
    mutate, message = INVALID[case]
    t = make_table(current_version=2)
    (spec,) = fill(t, 1)
    lease = t.lease("w1", now=0.0)
    good = result(lease, spec, version=2)
    r = t.accept(mutate(good), now=1.0)
    assert r.status is AckCode.INVALID_ARGUMENT and message in r.message, r.message
    assert r.to_pb() == pb.SubmitAck(group_id=spec.group_id, code=3, message=r.message)
    assert t.stats()["invalid_argument"] == 1 and t.stats()["accepted"] == 0
    assert t.take_batch(1) is None
    # The rest of the stream goes on: the same group, valid, is still accepted.
    assert t.accept(good, now=1.0).status is AckCode.OK


def test_without_an_adapter_samples_come_from_version_zero() -> None:
    t = make_table(adapter_name="", current_version=0)
    (spec,) = fill(t, 1)
    lease = t.lease("w1", now=0.0)
    assert lease.adapter_name == "" and lease.min_version == 0
    g = dataclasses.replace(result(lease, spec, version=1), adapter_name="")
    assert t.accept(g, now=1.0).status is AckCode.INVALID_ARGUMENT
    base = dataclasses.replace(g, samples=tuple(dataclasses.replace(s, adapter_version=0) for s in g.samples))
    assert t.accept(base, now=1.0).status is AckCode.OK


# ---------------------------------------------------------------------------- trainer side


def test_take_batch_is_in_arrival_order() -> None:
    t = make_table(groups_per_batch=3, max_staleness=0)
    specs = fill(t, 3)
    lease = t.lease("w1", now=0.0)
    arrivals = [result(lease, specs[i]) for i in (2, 0, 1)]
    for g in arrivals[:2]:
        t.accept(g, now=1.0)
    assert t.take_batch() is None  # nothing taken while short
    t.accept(arrivals[2], now=1.0)
    assert t.take_batch() == arrivals
    assert t.stats()["consumed"] == 3 and t.stats()["buffered"] == 0


def test_protobuf_round_trip() -> None:
    t = make_table()
    (spec,) = fill(t, 1)
    g = result(t.lease("w1", now=0.0), spec)
    assert TrajectoryGroupRecord.from_pb(g.to_pb()) == g
    assert SampleRecord.from_pb(g.samples[0].to_pb()) == g.samples[0]
    assert [int(s) for s in AckCode] == [0, 3, 6, 9]
    assert {c.name: int(c) for c in AckCode} == {n.removeprefix("ACK_"): v for n, v in pb.AckCode.items()}
    assert GroupSpec.from_pb(spec.to_pb()) == spec


def test_a_lease_reaches_the_rollout_side_whole() -> None:
    """What the worker reads back from the wire is the lease the table made, plus the
    learner's sampling template (n forced to the table's) and reward function."""
    from loraloop.v1 import rollout_pb2 as rpb
    from services.common.trajectories import AcceptResult

    t = make_table()
    fill(t, 2)
    lease = t.lease("w1", now=12.5)
    template = rpb.SamplingParams(max_tokens=7, temperature=1.0, n=99)
    back = Lease.from_pb(lease.to_pb(template, "arithmetic"), worker_id="w1")
    assert back == dataclasses.replace(lease, reward_fn="arithmetic") and back.deadline == lease.deadline
    assert back.n == N and back.sampling.max_tokens == 7 and back.sampling.n == N
    ack = AcceptResult("g:1", AckCode.ALREADY_EXISTS, "dup")
    assert AcceptResult.from_pb(ack.to_pb()) == ack and ack.status.delivered
    assert not AckCode.FAILED_PRECONDITION.delivered and AckCode.OK.delivered


# ---------------------------------------------------------------------------- checkpoints


def test_state_dict_resumes_the_same_batches_leases_and_accepted_set() -> None:
    t = make_table(max_staleness=1, groups_per_batch=2, current_version=1)
    fill(t, 6)
    a = t.lease("w1", max_groups=2, now=0.0)
    b = t.lease("w2", max_groups=2, now=0.0)
    t.accept(result(b, b.groups[1]), now=1.0)
    t.accept(result(a, a.groups[0]), now=1.0)
    t.accept(result(b, b.groups[0]), now=1.0)
    t.accept(dataclasses.replace(result(a, a.groups[1]), samples=()), now=1.0)  # invalid: counted
    assert len(t.take_batch(1)) == 1

    state = json.loads(json.dumps(t.state_dict()))  # JSON-serialisable as it stands
    restored = make_table(max_staleness=1, groups_per_batch=2, current_version=1, id_prefix="r")
    restored.load_state_dict(state)
    assert restored.stats() == t.stats()
    assert restored.state_dict() == t.state_dict()

    for table in (t, restored):  # both go on identically
        assert table.accept(result(b, b.groups[1]), now=2.0).status is AckCode.ALREADY_EXISTS
        assert table.accept(result(a, a.groups[1]), now=2.0).status is AckCode.OK  # old lease honoured
    assert restored.take_batch(2) == t.take_batch(2)
    restored.set_version(2)
    t.set_version(2)
    assert ids(restored.lease("w3", now=3.0)) == ids(t.lease("w3", now=3.0)) == ["p4:5", "p5:6"]
    assert restored.add("p9", [1]).group_id == t.add("p9", [1]).group_id == "p9:7"
    assert restored.stats() == t.stats()


def test_expire_leases_releases_outstanding_groups_first_in_order():

    t = LeaseTable(adapter_name="p", samples_per_group=2, groups_per_batch=4, vocab_size=16,
                   max_staleness=1, clock=lambda: 100.0, current_version=1)
    for k in range(6):
        t.add(f"u{k}", [1, 3 + k])
    first = t.lease("w1", 3)
    assert [g.group_id for g in first.groups] == ["u0:1", "u1:2", "u2:3"]
    restored = LeaseTable(adapter_name="p", samples_per_group=2, groups_per_batch=4, vocab_size=16,
                          max_staleness=1, clock=lambda: 100.0)
    restored.load_state_dict(t.state_dict())
    assert isinstance(restored.lease("w2", 3), Lease)  # fresh groups while the old lease still runs
    restored.load_state_dict(t.state_dict())
    assert restored.expire_leases() == 3
    again = restored.lease("w2", 3)
    assert [g.group_id for g in again.groups] == ["u0:1", "u1:2", "u2:3"]
