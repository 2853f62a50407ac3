"""Bad input against the learner's lease service over loopback (issue 19, "Bad input,
everywhere it enters"): raw bytes to both methods, leases asked with any worker id and size,
trajectory groups with every field wrong (NaN/inf rewards and log-probs, token ids outside the
tiny model's vocabulary, unknown leases, groups and versions, wrong sample counts), an
oversized group, a submit stream cut off mid-way. Every group gets its ack (never OK), the
stream goes on, and the lease table's counters move exactly as the acks say: nothing accepted,
nothing lost; then the real groups are accepted once.

The server is the learner's own (LearnerServicer + LeaseTable behind the shared gRPC server
with auth) on a thread of this process, as the learner's Coordinator runs it, without the
training loop: so the table's counters can be read before and after."""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraloop.v1 import learner_pb2 as pb
from loraloop.v1 import learner_pb2_grpc as pb_grpc
from loraloop.v1 import rollout_pb2 as rpb
from services.common.config import AuthConfig, ServerConfig, TLSConfig
from services.common.grpc_server import Registration, ServerThread
from services.learner.leases import LeaseTable
from services.learner.service import ROLES_OF_METHOD, SERVICE, LearnerServicer
from tests.support.bad_input import (
    CASES,
    assert_clear,
    bounded,
    call_raw,
    read_stream,
    register_summary,
)
from tests.support.procs import TOKENS

SVC = "/loraloop.v1.Learner/"
ADAPTER = "bl"
N = 4  # samples per group
MD = (("authorization", f"Bearer {TOKENS['rollout']}"),)


@dataclass
class Learner:
    table: LeaseTable
    server: ServerThread
    channel: grpc.Channel
    lease: pb.Lease  # taken before any bad input: its groups are submitted, good, at the end
    vocab: int


@pytest.fixture(scope="module")
def learner(tiny_model, tmp_path_factory, request):
    register_summary(request.config)
    vocab = int(json.loads((tiny_model / "config.json").read_text())["vocab_size"])
    table = LeaseTable(adapter_name=ADAPTER, samples_per_group=N, groups_per_batch=4, vocab_size=vocab,
                       max_staleness=8, lease_timeout_s=3600, max_groups_per_lease=4)
    table.set_version(1)  # as after the learner's first publish
    for k in range(table.wanted()):
        table.add(f"p{k}", [1, 3 + k % 10, 13, 3 + (k // 10) % 10, 14], f"{k % 10}+{(k // 10) % 10}=")
    tokens = tmp_path_factory.mktemp("bad-input-learner") / "tokens"
    tokens.write_text("".join(f"{role}:{tok}\n" for role, tok in TOKENS.items()))
    servicer = LearnerServicer(table, rpb.SamplingParams(max_tokens=4, temperature=1.0, n=N, logprobs=True),
                               "arithmetic")
    server = ServerThread([Registration(pb_grpc.add_LearnerServicer_to_server, servicer, SERVICE)],
                          ServerConfig(host="127.0.0.1", port=0, grace_s=1),
                          AuthConfig(tokens_env="LORALOOP_BAD_INPUT_NO_TOKENS", tokens_file=str(tokens)),
                          TLSConfig(), ROLES_OF_METHOD, name="bad-input-learner")
    port = server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    lease = pb_grpc.LearnerStub(channel).LeasePrompts(pb.LeaseRequest(worker_id="good", max_groups=4),
                                                      metadata=MD, timeout=10).leases[0]
    yield Learner(table, server, channel, lease, vocab)
    channel.close()
    server.stop()


def good_group(lease: pb.Lease, g: pb.PromptGroup) -> pb.TrajectoryGroup:
    samples = [pb.Sample(response_token_ids=[3 + j, 12, 2], logprobs=[-1.5, -1.0, -0.5], reward=float(j % 2),
                         finish_reason="stop", adapter_version=lease.min_version) for j in range(N)]
    return pb.TrajectoryGroup(lease_id=lease.lease_id, group_id=g.group_id, prompt_token_ids=g.prompt_token_ids,
                              adapter_name=lease.adapter_name, samples=samples)


# The stats counters no bad input may move (gauges of accepted work) ...
KEPT = ("accepted", "accepted_late", "consumed", "buffered", "dropped_stale_buffered")
# ... and those each refusal adds one to, by its ack code.
REFUSED = {pb.ACK_INVALID_ARGUMENT: "invalid_argument", pb.ACK_FAILED_PRECONDITION: "failed_precondition",
           pb.ACK_ALREADY_EXISTS: "already_exists"}


@pytest.fixture
def counted(learner):
    """Nothing accepted or consumed by the test; the refusal counters grow by exactly the acks
    the test reports (`acks.extend(...)`), leases granted by exactly the leases it saw."""
    before = learner.table.stats()
    seen: dict = {"acks": [], "leases": 0, "groups leased": 0}
    yield seen
    assert learner.server._thread.is_alive(), "the learner's server thread died"
    after = learner.table.stats()
    assert {k: after[k] for k in KEPT} == {k: before[k] for k in KEPT}
    for code, key in REFUSED.items():
        assert after[key] - before[key] == sum(a.code == code for a in seen["acks"]), key
    assert after["leases_granted"] - before["leases_granted"] == seen["leases"]
    assert after["groups_leased"] - before["groups_leased"] == seen["groups leased"]
    # and it still serves: a lease request is answered
    r = pb_grpc.LearnerStub(learner.channel).LeasePrompts(pb.LeaseRequest(worker_id="probe", max_groups=0),
                                                          metadata=MD, timeout=10)
    seen_probe = len(r.leases)
    assert seen_probe in (0, 1)


def _count_leases(seen: dict, raw: bytes) -> pb.LeaseResponse:
    r = pb.LeaseResponse.FromString(raw)
    seen["leases"] += len(r.leases)
    seen["groups leased"] += sum(len(x.groups) for x in r.leases)
    return r


# ------------------------------------------------------------------ raw bytes


@bounded(60)
@given(method=st.sampled_from(["LeasePrompts", "SubmitTrajectories"]),
       payload=st.one_of(st.binary(max_size=48), st.just(b"\x0a\x03\xff\xfe\xfd"),
                         st.just(b"\x12\x03\xc0\xaf\x80"), st.just(b"\x0a\x01")))
def test_raw_bytes(learner, counted, method, payload):
    CASES(f"learner {method} (raw bytes)")
    if method == "LeasePrompts":
        out = call_raw(learner.channel, SVC + method, "uu", payload, MD)
        assert_clear(out, what=payload)
        if out.code == grpc.StatusCode.OK:  # bytes that parse as a LeaseRequest: a lease answer
            r = _count_leases(counted, out.responses[0])
            assert len(r.leases) <= 1 and all(len(x.groups) <= 4 for x in r.leases)
        return
    out = call_raw(learner.channel, SVC + method, "ss", [payload], MD)
    assert_clear(out, what=payload)
    counted["acks"] += [pb.SubmitAck.FromString(a) for a in out.responses]
    if out.code == grpc.StatusCode.OK:  # it parsed: one ack, a refusal
        assert len(out.responses) == 1 and counted["acks"][-1].code != pb.ACK_OK and counted["acks"][-1].message


# ------------------------------------------------------------------ leases


@bounded(40)
@given(worker_id=st.one_of(st.text(max_size=40), st.just("w" * 100_000), st.just("\x00\ud7ff\ufffd")),
       max_groups=st.one_of(st.sampled_from([0, 1, 4, 5, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1)))
def test_lease_any_worker_and_size(learner, counted, worker_id, max_groups):
    CASES("learner LeasePrompts")
    req = pb.LeaseRequest(worker_id=worker_id, max_groups=max_groups)
    out = call_raw(learner.channel, SVC + "LeasePrompts", "uu", req.SerializeToString(), MD)
    assert out.code == grpc.StatusCode.OK, out
    r = _count_leases(counted, out.responses[0])
    for lease in r.leases:
        assert 0 < len(lease.groups) <= min(4, max_groups or 4)
        assert lease.sampling.n == N and lease.min_version == 1
        assert all(0 <= t < learner.vocab for g in lease.groups for t in g.prompt_token_ids)
    if not r.leases:
        assert r.retry_after_ms > 0 or r.finished


# ------------------------------------------------------------------ trajectories


# not finite, or not once the trainer makes it a float32 (1e39 passed, and poisoned the batch)
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf, -math.nan, 1e39, -1e300, 3.5e38])
BIG_IDS = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([2**32 - 1, 2**31]))


@st.composite
def bad_group(draw, learner: Learner):
    """One of the lease's groups with something wrong that must refuse it."""
    lease = learner.lease
    g = good_group(lease, draw(st.sampled_from(list(lease.groups))))
    s = g.samples[draw(st.integers(0, N - 1))]
    what = draw(st.sampled_from([
        "reward", "logprob", "response id", "prompt id", "prompt changed", "no prompt", "no response",
        "lengths", "samples", "version", "adapter", "lease", "group", "many samples"]))
    if what == "reward":
        s.reward = draw(NON_FINITE)
    elif what == "logprob":
        s.logprobs[draw(st.integers(0, 2))] = draw(NON_FINITE)
    elif what == "response id":
        s.response_token_ids[draw(st.integers(0, 2))] = draw(BIG_IDS.filter(lambda t: t >= learner.vocab))
    elif what == "prompt id":
        g.prompt_token_ids[draw(st.integers(0, len(g.prompt_token_ids) - 1))] = draw(
            BIG_IDS.filter(lambda t: t >= learner.vocab))
    elif what == "prompt changed":
        g.prompt_token_ids.append(draw(st.integers(0, learner.vocab - 1)))
    elif what == "no prompt":
        del g.prompt_token_ids[:]
    elif what == "no response":
        del s.response_token_ids[:]
        del s.logprobs[:]
    elif what == "lengths":
        del s.logprobs[-1]
    elif what == "samples":
        k = draw(st.sampled_from([0, 1, N - 1, N + 1, 64]))
        samples = list(g.samples)
        del g.samples[:]
        g.samples.extend((samples * 64)[:k])
    elif what == "version":
        s.adapter_version = draw(st.sampled_from([0, 2, 3, 2**63, 2**64 - 1]))
    elif what == "adapter":
        g.adapter_name = draw(st.text(max_size=20).filter(lambda x: x != ADAPTER))
    elif what == "lease":
        g.lease_id = draw(st.text(max_size=40).filter(lambda x: x != lease.lease_id))
    elif what == "group":
        g.group_id = draw(st.one_of(st.text(max_size=40), st.just("p0:1" * 10_000)).filter(
            lambda x: x not in {gr.group_id for gr in lease.groups}))
    else:  # many samples: 5,000 of them
        one = g.samples[0]
        del g.samples[:]
        g.samples.extend([one] * 5_000)
    return what, g


@bounded(80)
@given(data=st.data())
def test_bad_groups_are_refused_and_the_stream_goes_on(learner, counted, data):
    groups = data.draw(st.lists(bad_group(learner), min_size=1, max_size=4))
    CASES("learner SubmitTrajectories (bad groups)", len(groups))
    out = call_raw(learner.channel, SVC + "SubmitTrajectories", "ss", [g.SerializeToString() for _, g in groups], MD)
    acks = [pb.SubmitAck.FromString(a) for a in out.responses]
    counted["acks"] += acks
    assert out.code == grpc.StatusCode.OK, out
    assert len(acks) == len(groups)  # every group answered, in order
    for (what, g), ack in zip(groups, acks, strict=True):
        assert ack.group_id == g.group_id
        assert ack.code in (pb.ACK_INVALID_ARGUMENT, pb.ACK_FAILED_PRECONDITION), (what, ack)
        assert ack.message, what


def test_oversized_and_cut_off_streams(learner, counted):
    stub_call = learner.channel.stream_stream(SVC + "SubmitTrajectories", request_serializer=lambda b: b,
                                              response_deserializer=lambda b: b)
    g = good_group(learner.lease, learner.lease.groups[0])
    g.samples[0].reward_details_json = "x" * (17 << 20)  # past the 16 MiB message limit
    out = call_raw(learner.channel, SVC + "SubmitTrajectories", "ss", [g.SerializeToString()], MD, timeout=30)
    assert_clear(out, {grpc.StatusCode.RESOURCE_EXHAUSTED}, ok=False)
    # a stream that sends two bad groups, reads one ack and is cancelled while still open
    bad = good_group(learner.lease, learner.lease.groups[0])
    bad.samples[0].reward = math.nan

    cancelled = threading.Event()

    def requests():
        yield bad.SerializeToString()
        yield bad.SerializeToString()
        cancelled.wait(30)  # the stream stays open until the client cancels it

    call = stub_call(requests(), metadata=MD, timeout=60)
    first = pb.SubmitAck.FromString(next(call))
    counted["acks"].append(first)
    assert first.code == pb.ACK_INVALID_ARGUMENT
    second = pb.SubmitAck.FromString(next(call))
    counted["acks"].append(second)
    call.cancel()
    cancelled.set()
    rest = read_stream(call)
    assert rest.code == grpc.StatusCode.CANCELLED
    CASES("learner SubmitTrajectories (oversized)")
    CASES("learner SubmitTrajectories (cut off)")


def test_values_past_float32_are_refused(learner, counted):
    """Finite as float64, inf as the trainer's float32: accepted before, NaN advantages after."""
    stub = pb_grpc.LearnerStub(learner.channel)
    groups = []
    for reward, logprob in ((1e39, -1.0), (-1e300, -1.0), (1.0, -1e39)):
        g = good_group(learner.lease, learner.lease.groups[1])
        g.samples[2].reward = reward
        g.samples[2].logprobs[0] = logprob
        groups.append(g)
    acks = list(stub.SubmitTrajectories(iter(groups), metadata=MD, timeout=30))
    counted["acks"] += acks
    assert [a.code for a in acks] == [pb.ACK_INVALID_ARGUMENT] * 3, acks
    CASES("learner SubmitTrajectories (past float32)", 3)


def test_the_leased_groups_are_still_accepted_once(learner):
    """After everything above, the lease taken first is honoured: each group accepted once,
    then ALREADY_EXISTS."""
    stub = pb_grpc.LearnerStub(learner.channel)
    good = [good_group(learner.lease, g) for g in learner.lease.groups]
    before = learner.table.stats()["accepted"]
    acks = list(stub.SubmitTrajectories(iter(good + good[:1]), metadata=MD, timeout=30))
    assert [a.code for a in acks] == [pb.ACK_OK] * len(good) + [pb.ACK_ALREADY_EXISTS]
    assert learner.table.stats()["accepted"] == before + len(good)
