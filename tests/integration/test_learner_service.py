"""The learner service against a real broker (issue 4, points 3 and 4)."""

from __future__ import annotations

import math
import threading
import time

import torch
from safetensors.torch import load as load_safetensors

from loraloop.v1 import learner_pb2 as pb
from services.broker.client import BrokerClient
from services.learner.metrics import read_metrics
from tests.support.procs import TOKENS, LearnerProc
from tests.support.scripted_rollout import ScriptedRollout, deterministic_group

SMALL = ["--data.groups_per_step=4", "--data.samples_per_group=4", "--algo.max_staleness=0",
         "--data.lease_deadline_s=5", "--algo.lr=1e-2", "--algo.kl_coef=0.01"]


def _variant(good: pb.TrajectoryGroup, **change) -> pb.TrajectoryGroup:
    g = pb.TrajectoryGroup()
    g.CopyFrom(good)
    if "sample0" in change:
        change.pop("sample0")(g.samples[0])
    for k, v in change.items():
        if k == "samples":
            del g.samples[:]
            g.samples.extend(v)
        elif k == "prompt_token_ids":
            del g.prompt_token_ids[:]
            g.prompt_token_ids.extend(v)
        else:
            setattr(g, k, v)
    return g


def test_bad_trajectories_refused_counted_and_the_stream_goes_on(base_stack, tmp_path):
    s = base_stack
    learner = LearnerProc(s.model, s.broker.target, tmp_path / "run", "--adapter_name=valid", "--steps=1", *SMALL)
    client = ScriptedRollout(learner.target)
    try:
        lease = client.lease(max_groups=4)
        good = [deterministic_group(lease, g) for g in lease.groups]
        v = lease.min_version

        def shorter_logprobs(x):
            del x.logprobs[-1]

        def out_of_vocab(x):
            x.response_token_ids[0] = 99

        def nan_reward(x):
            x.reward = math.nan

        def future_version(x):
            x.adapter_version = v + 5

        def older_than_lease(x):
            x.adapter_version = v - 1 if v > 1 else 0

        bad = {
            "lengths disagree": (_variant(good[0], sample0=shorter_logprobs), 3),
            "id outside the vocabulary": (_variant(good[0], sample0=out_of_vocab), 3),
            "reward not finite": (_variant(good[0], sample0=nan_reward), 3),
            "unknown version": (_variant(good[0], sample0=future_version), 3),
            "wrong number of samples": (_variant(good[0], samples=list(good[0].samples)[:2]), 3),
            "prompt differs from the lease": (_variant(good[0], prompt_token_ids=[1, 3, 3]), 3),
            "unknown group": (_variant(good[0], group_id="nope:1"), 9),
            "older than the lease": (_variant(good[0], sample0=older_than_lease), 9 if v > 1 else 3),
        }
        # One stream: every bad variant of group 0 (not accepted yet), then the four good
        # groups, then group 0 again (a duplicate by then).
        stream = [g for g, _ in bad.values()] + good + [good[0]]
        acks = client.submit(stream)
        assert len(acks) == len(stream)  # every group answered: the stream did not end at a refusal
        for (name, (_, code)), ack in zip(bad.items(), acks, strict=False):
            assert ack.code == code, (name, ack.code, ack.message)
            assert ack.message, name
        assert [a.code for a in acks[len(bad):]] == [0, 0, 0, 0, 6]  # accepted, then ALREADY_EXISTS
        assert learner.wait(120) == 0  # the 4 good groups made the one step; the run ended
    finally:
        client.close()
        if learner.proc.poll() is None:
            learner.kill()
    row = read_metrics(tmp_path / "run")[0]
    assert row["leases/invalid_argument"] == sum(code == 3 for _, code in bad.values())
    assert row["leases/failed_precondition"] == sum(code == 9 for _, code in bad.values())
    assert row["leases/already_exists"] == 1 and row["leases/accepted"] == 4


def _step_adapters(broker_target: str, name: str) -> list[tuple[int, int, int, dict]]:
    """(version, learner_step, epoch, tensors) of every version of `name`."""
    out = []
    with BrokerClient(broker_target, TOKENS["client"]) as c:
        for rec in c.list_versions(name)[0]:
            _, data = c.fetch(rec.ref)
            out.append((rec.version, rec.learner_step, rec.publisher_epoch, load_safetensors(data)))
    return out


def _drive(target: str, results: list) -> None:
    client = ScriptedRollout(target)
    try:
        results.append(client.run_until_finished(timeout_s=300))
    finally:
        client.close()


def test_sigkill_and_resume_gives_the_same_next_update(base_stack, tmp_path):
    s = base_stack
    args = ["--steps=4", "--checkpoint.every=2", *SMALL]
    # Run A: uninterrupted.
    a = LearnerProc(s.model, s.broker.target, tmp_path / "a", "--adapter_name=resume-a", *args)
    done: list = []
    _drive(a.target, done)
    assert a.wait(120) == 0
    # Run B: SIGKILL once the step-2 checkpoint exists, then resume.
    b = LearnerProc(s.model, s.broker.target, tmp_path / "b", "--adapter_name=resume-b", *args)
    t = threading.Thread(target=_drive, args=(b.target, done), daemon=True)
    t.start()
    deadline = time.monotonic() + 120
    while not (tmp_path / "b" / "checkpoints" / "step-000002" / "state.json").exists():
        assert time.monotonic() < deadline and b.proc.poll() is None
        time.sleep(0.01)
    b.kill()
    t.join(30)
    b2 = LearnerProc(s.model, s.broker.target, tmp_path / "b", "--adapter_name=resume-b", *args)
    _drive(b2.target, done)
    assert b2.wait(120) == 0
    assert "resumed from" in b2.log_path.read_text()

    va, vb = _step_adapters(s.broker.target, "resume-a"), _step_adapters(s.broker.target, "resume-b")
    step3_a = [x for x in va if x[1] == 3]
    step3_b = [x for x in vb if x[1] == 3]
    assert len(step3_a) == 1 and step3_b
    after_resume = max(step3_b, key=lambda x: x[0])  # the update made by the resumed learner
    for k, ta in step3_a[0][3].items():
        assert torch.allclose(ta, after_resume[3][k], atol=1e-6, rtol=0), k
    # ... and the step-4 update too
    (a4,), b4 = [x for x in va if x[1] == 4], max((x for x in vb if x[1] == 4), key=lambda x: x[0])
    assert all(torch.allclose(a4[3][k], b4[3][k], atol=1e-6, rtol=0) for k in a4[3])
    versions = [x[0] for x in vb]
    assert versions == sorted(set(versions))  # no version number twice
    epochs = [x[2] for x in vb]
    assert epochs == sorted(epochs) and epochs[-1] == epochs[0] + 1  # the resumed learner took a new epoch
    assert max(x[1] for x in vb) == 4
