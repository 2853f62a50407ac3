"""The validation pass's rounds without gRPC (services/learner/validation.py): leases of one
mode each with that mode's sampling, accept-once, invalid groups leased again, expired leases
leased again, one round at a time, and the row's arithmetic (mean reward, accuracy from `acc`
or the threshold, pass@n, per data source)."""

from __future__ import annotations

import json

import pytest

from loraloop.v1 import rollout_pb2 as rpb
from services.common.trajectories import AckCode, SampleRecord, TrajectoryGroupRecord
from services.learner.validation import Validator, ValPrompt, is_correct

VOCAB, ADAPTER = 20, "policy"
MODES = {"greedy": rpb.SamplingParams(max_tokens=2, temperature=0.0, n=1),
         "sampled": rpb.SamplingParams(max_tokens=2, temperature=1.0, n=3)}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def prompts(k: int = 3, sources: tuple[str, ...] = ("a",)) -> list[ValPrompt]:
    return [ValPrompt(f"p{i}", (1, 2, i + 3), f"q{i}", sources[i % len(sources)], str(i)) for i in range(k)]


def make(k: int = 3, sources: tuple[str, ...] = ("a",), **kw) -> tuple[Validator, list[dict], Clock]:
    rows: list[dict] = []
    clock = Clock()
    v = Validator(prompts(k, sources), adapter_name=ADAPTER, modes=MODES, reward_fn="arithmetic", vocab_size=VOCAB,
                  lease_timeout_s=10, max_groups_per_lease=2, on_done=rows.append, clock=clock, **kw)
    return v, rows, clock


def answer(lease, rewards: dict[str, list[float]] | None = None, version: int = 5, details: str = "") -> list:
    out = []
    for g in lease.groups:
        rs = (rewards or {}).get(g.prompt_uid, [1.0] * lease.n)
        out.append(TrajectoryGroupRecord(
            lease.lease_id, g.group_id, g.prompt_token_ids, ADAPTER,
            tuple(SampleRecord((4,), (-0.1,), r, version, reward_details_json=details) for r in rs)))
    return out


def drain(v: Validator, rewards=None, version: int = 5) -> None:
    while (got := v.lease("w")) is not None:
        lease, _ = got
        for rec in answer(lease, rewards, version):
            assert v.accept(rec, current_version=version).status is AckCode.OK


def test_no_round_no_leases_and_one_round_at_a_time():
    v, rows, _ = make()
    assert v.lease("w") is None and not v.running
    assert v.start(0, 5) and v.running
    assert not v.start(10, 6) and v.skipped == 1  # the first is still out
    drain(v)
    assert not v.running and v.wait(0) and len(rows) == 1
    assert rows[0]["val/skipped_rounds"] == 1 and rows[0]["step"] == 0
    assert v.start(10, 6)


def test_leases_carry_one_mode_and_its_sampling():
    v, _, _ = make(k=3)
    v.start(0, 5)
    seen = {}
    while (got := v.lease("w", max_groups=8)) is not None:
        lease, sampling = got
        modes = {g.group_id.split(":")[2] for g in lease.groups}
        assert len(modes) == 1 and len(lease.groups) <= 2  # max_groups_per_lease
        mode = modes.pop()
        assert sampling is MODES[mode] and lease.n == (sampling.n or 1) and lease.min_version == 5
        assert lease.to_pb(sampling).sampling.temperature == sampling.temperature
        for g in lease.groups:
            seen[g.group_id] = mode
    assert sorted(seen.values()).count("greedy") == 3 and sorted(seen.values()).count("sampled") == 3
    assert all(Validator.owns(g) for g in seen)


def test_accept_once_invalid_and_expired_groups_lease_again():
    v, rows, clock = make(k=1)
    v.start(3, 5)
    lease, _ = v.lease("w")  # greedy first
    (rec,) = answer(lease)
    bad = TrajectoryGroupRecord(rec.lease_id, rec.group_id, rec.prompt_token_ids, ADAPTER,
                                rec.samples * 2)  # 2 samples for n=1
    assert v.accept(bad, 5).status is AckCode.INVALID_ARGUMENT
    again, _ = v.lease("w")
    assert again.groups[0].group_id == rec.group_id  # refused: free to lease at once
    old = TrajectoryGroupRecord(rec.lease_id, rec.group_id, rec.prompt_token_ids, ADAPTER,
                                (SampleRecord((4,), (-0.1,), 1.0, 4),))
    assert v.accept(old, 5).status is AckCode.INVALID_ARGUMENT  # v4 < the round's v5
    assert v.accept(TrajectoryGroupRecord("nope", rec.group_id, rec.prompt_token_ids, ADAPTER, rec.samples),
                    5).status is AckCode.FAILED_PRECONDITION
    assert v.accept(rec, 5).status is AckCode.OK
    assert v.accept(rec, 5).status is AckCode.ALREADY_EXISTS
    s_lease, _ = v.lease("w")
    assert v.lease("w") is None  # nothing free until the deadline
    clock.t += 11
    s_again, _ = v.lease("w2")
    assert [g.group_id for g in s_again.groups] == [g.group_id for g in s_lease.groups]
    for r in answer(s_lease, version=6):  # the late answer under the first lease still counts
        assert v.accept(r, 6).status is AckCode.OK
    assert len(rows) == 1 and (rows[0]["val/version_min"], rows[0]["val/version_max"]) == (5, 6)
    assert v.accept(rec, 6).status is AckCode.FAILED_PRECONDITION  # round over


def test_row_arithmetic():
    v, rows, _ = make(k=4, sources=("a", "b"))
    v.start(20, 7)
    # greedy: p0 1, p1 0, p2 0.5, p3 1 -> mean 0.625, accuracy 2/4 (threshold 1.0)
    # sampled (n=3): p0 [1,0,0], p1 [0,0,0], p2 [0.5,1,0], p3 [0,0,0] -> mean 2.5/12, acc 2/12, pass@3 2/4
    greedy = {"p0": [1.0], "p1": [0.0], "p2": [0.5], "p3": [1.0]}
    sampled = {"p0": [1.0, 0.0, 0.0], "p1": [0.0] * 3, "p2": [0.5, 1.0, 0.0], "p3": [0.0] * 3}
    while (got := v.lease("w")) is not None:
        lease, sampling = got
        for rec in answer(lease, greedy if sampling.n == 1 else sampled, version=7):
            v.accept(rec, 7)
    (row,) = rows
    assert row["step"] == 20 and row["val/version"] == 7 and row["val/prompts"] == 4
    assert row["val/greedy/reward/mean"] == pytest.approx(0.625) and row["val/greedy/accuracy"] == 0.5
    assert row["val/sampled/reward/mean"] == pytest.approx(2.5 / 12)
    assert row["val/sampled/accuracy"] == pytest.approx(2 / 12) and row["val/sampled/pass@3"] == 0.5
    assert "val/greedy/pass@1" not in row
    # per data source: a = p0, p2; b = p1, p3
    assert row["val/greedy/a/reward/mean"] == pytest.approx(0.75) and row["val/greedy/b/accuracy"] == 0.5
    assert row["val/sampled/b/reward/mean"] == 0.0


def test_accuracy_from_acc_details_or_threshold():
    assert is_correct(0.1, json.dumps({"acc": True}), 1.0)
    assert not is_correct(1.0, json.dumps({"acc": 0}), 1.0)
    assert is_correct(1.0, "", 1.0) and not is_correct(0.99, "", 1.0)
    assert is_correct(0.5, "not json", 0.5)
    v, rows, _ = make(k=1, correct_threshold=0.5)
    v.start(0, 5)
    while (got := v.lease("w")) is not None:
        lease, sampling = got
        for rec in answer(lease, {"p0": [0.5] * (sampling.n or 1)}):
            v.accept(rec, 5)
    assert rows[0]["val/greedy/accuracy"] == 1.0 and rows[0]["val/sampled/accuracy"] == 1.0


def test_on_done_error_still_ends_the_round():
    def boom(row):
        raise OSError("disk full")

    v = Validator(prompts(1), adapter_name=ADAPTER, modes={"greedy": MODES["greedy"]}, reward_fn="x",
                  vocab_size=VOCAB, on_done=boom)
    v.start(0, 1)
    lease, _ = v.lease("w")
    (rec,) = answer(lease, version=1)
    assert v.accept(rec, 1).status is AckCode.OK  # logged, not raised into the lease service
    assert not v.running and v.wait(0)
