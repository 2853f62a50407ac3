"""Rollout with the real vLLM CPU engine (issue 3, points 1-4)."""

from __future__ import annotations

import json
import os
import threading
import time

import grpc
import numpy as np
import pytest
from safetensors.numpy import save

from services.broker.client import BrokerClient
from services.common import events
from services.rollout.adapters import ADAPTER_LOADED
from tests.support.peft_adapters import make_peft_adapter, peft_reference
from tests.support.procs import TOKENS
from tests.support.proctree import cpu_seconds, descendants
from tests.support.rollout_client import AdapterWatch, generate, list_adapters

PROMPT = [1, 6, 13, 11, 14]  # "<bos>3+8=" in the tiny model's character vocabulary
# fp32 on both sides; vLLM's CPU kernels (oneDNN matmuls, its own attention) sum in another
# order than torch's, which moves log-probs by ~1e-6 over 16 tokens (measured 9.5e-7). 1e-4
# leaves that 100x headroom and is still ~1000x smaller than what the adapter changes (>0.1).
LOGPROB_TOL = 1e-4
# Samples of the long v1 request in the hot-load test: long enough to still run when v2 has
# loaded (8 were not always, once the fast LoRA ops made the one-adapter batch ~2.5x faster).
LONG_N = 24


def publish(stack, name: str, adapter_dir, fingerprint: str | None = None) -> int:
    with BrokerClient(stack.broker.target, TOKENS["learner"]) as c:
        epoch, _ = c.acquire_publisher(name)
        rec, _ = c.publish_dir(name, epoch, adapter_dir, fingerprint or stack.fingerprint)
        return rec.version


def wait_latest(stack, name: str, version: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(a.name == name and a.version == version and a.latest
               for a in list_adapters(stack.rollout.target).adapters):
            return
        time.sleep(0.05)
    raise AssertionError(f"{name}@v{version} never became latest: {list_adapters(stack.rollout.target)}")


def test_greedy_tokens_and_logprobs_match_peft(rollout_stack, tmp_path):
    s = rollout_stack
    adapter = make_peft_adapter(s.model, tmp_path / "a", seed=11)
    publish(s, "corr", adapter)
    for sel, adir in (("", None), ("corr@v1", adapter)):
        got = generate(s.rollout.target, PROMPT, sel, max_tokens=16)
        ref_tokens, ref_lps = peft_reference(s.model, adir, PROMPT, 16)
        assert got.tokens[0] == ref_tokens, sel
        assert np.max(np.abs(np.array(got.logprobs[0]) - np.array(ref_lps))) < LOGPROB_TOL, sel
    base = generate(s.rollout.target, PROMPT, "", max_tokens=16)
    tuned = generate(s.rollout.target, PROMPT, "corr@v1", max_tokens=16)
    assert base.versions == {("", 0)} and tuned.versions == {("corr", 1)}
    assert np.max(np.abs(np.array(base.logprobs[0]) - np.array(tuned.logprobs[0]))) > 0.1  # the adapter acts


def test_hot_load_under_traffic(rollout_stack, tmp_path):
    s = rollout_stack
    publish(s, "hot", make_peft_adapter(s.model, tmp_path / "v1", seed=21))
    wait_latest(s, "hot", 1)
    long_result: dict = {}
    first_token = threading.Event()

    def long_request() -> None:
        with grpc.insecure_channel(s.rollout.target) as ch:
            from loraloop.v1 import rollout_pb2 as pb
            from loraloop.v1 import rollout_pb2_grpc as pbg

            msgs = []
            for m in pbg.RolloutStub(ch).Generate(pb.GenerateRequest(
                    token_ids=pb.TokenIds(ids=PROMPT), adapter="hot",
                    params=pb.SamplingParams(max_tokens=500, n=LONG_N, temperature=1.0, seed=3, ignore_eos=True)),
                    metadata=(("authorization", f"Bearer {TOKENS['client']}"),), timeout=300):
                msgs.append(m)
                first_token.set()
            long_result["msgs"] = msgs
            long_result["done_at"] = time.monotonic()

    t = threading.Thread(target=long_request)
    t.start()
    assert first_token.wait(60)
    publish(s, "hot", make_peft_adapter(s.model, tmp_path / "v2", seed=22))
    wait_latest(s, "hot", 2)
    switched_at = time.monotonic()
    after = generate(s.rollout.target, PROMPT, "hot", max_tokens=4)
    t.join(300)
    msgs = long_result["msgs"]
    assert long_result["done_at"] > switched_at, "the long request ended before v2 loaded: make it longer"
    assert {(m.adapter_name, m.adapter_version) for m in msgs} == {("hot", 1)}
    assert sum(len(m.token_ids) for m in msgs) == LONG_N * 500 and all(m.finish_reason == "length"
                                                                  for m in msgs if m.finished)
    assert after.versions == {("hot", 2)}
    # "hot" was followed when v2 was published: the server loaded v2 from the broker's relay of
    # the upload (staged), then served it as the version the commit named.
    loads = {e["version"]: e for e in events.read_file(s.rollout.log_path, ADAPTER_LOADED) if e["name"] == "hot"}
    assert loads[2].get("staged") is True and loads[2]["commit_wait_ms"] >= 0, loads[2]
    # v1 drained: unloaded once its request ended. The server unloads it after sending the last
    # message (as the request's context exits), so the client may look a few ms too early.
    deadline = time.monotonic() + 10
    while (loaded := {(a.name, a.version) for a in list_adapters(s.rollout.target).adapters
                      if a.name == "hot"}) != {("hot", 2)} and time.monotonic() < deadline:
        time.sleep(0.02)
    assert loaded == {("hot", 2)}
    # a pinned request for v1 still works: fetched again from the broker
    assert generate(s.rollout.target, PROMPT, "hot@v1", max_tokens=2).versions == {("hot", 1)}


def test_three_adapters_in_one_batch_match_each_alone(rollout_stack, tmp_path):
    s = rollout_stack
    names = ["mix-a", "mix-b", "mix-c"]
    prompts = [PROMPT, [1, 4, 13, 12, 14], [1, 10, 13, 5, 14]]  # 3+8=, 1+9=, 7+2=
    for i, n in enumerate(names):
        publish(s, n, make_peft_adapter(s.model, tmp_path / n, seed=30 + i))
    jobs = [(n, k) for n in names for k in range(len(prompts))]
    alone = {(n, k): generate(s.rollout.target, prompts[k], f"{n}@v1", max_tokens=24).tokens[0] for n, k in jobs}
    assert len({json.dumps(alone[(n, 0)]) for n in names}) == 3  # three different adapters
    together: dict = {}
    start = threading.Barrier(len(jobs))

    def run(n: str, k: int) -> None:
        start.wait()
        together[(n, k)] = generate(s.rollout.target, prompts[k], f"{n}@v1", max_tokens=24).tokens[0]

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert together == alone


def test_bad_requests_are_invalid_argument(rollout_stack):
    target = rollout_stack.rollout.target
    for kwargs in ({"n": 2, "temperature": 0.0}, {"max_tokens": 10_000}):
        with pytest.raises(grpc.RpcError) as err:
            generate(target, PROMPT, "", **kwargs)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        generate(target, [1, 99], "")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "vocabulary" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        generate(target, PROMPT, "never-published@v1")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def _fake_adapter_dir(path, module_path: str, rank: int = 4, dim: int = 128):
    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    save_bytes = save({f"{module_path}.lora_A.weight": rng.standard_normal((rank, dim), dtype=np.float32),
                       f"{module_path}.lora_B.weight": rng.standard_normal((dim, rank), dtype=np.float32)})
    (path / "adapter_model.safetensors").write_bytes(save_bytes)
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["q_proj"],
        "task_type": "CAUSAL_LM"}))
    return path


def _refused(target: str, selector: str) -> str:
    with pytest.raises(grpc.RpcError) as err:
        generate(target, PROMPT, selector, max_tokens=2)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    return err.value.details()


def test_refused_adapters_and_serving_goes_on(rollout_stack, tmp_path):
    s = rollout_stack
    target = s.rollout.target
    good = make_peft_adapter(s.model, tmp_path / "good", seed=40)
    publish(s, "keep", good)
    wait_latest(s, "keep", 1)
    before = generate(target, PROMPT, "keep", max_tokens=8)

    publish(s, "other-base", good, fingerprint="sha256:" + "0" * 64)
    assert "trained on base" in _refused(target, "other-base@v1")
    publish(s, "big-rank", make_peft_adapter(s.model, tmp_path / "r32", seed=41, rank=32))
    assert "rank 32 > max_lora_rank 16" in _refused(target, "big-rank@v1")
    publish(s, "no-module", _fake_adapter_dir(tmp_path / "nm", "base_model.model.model.layers.7.self_attn.q_proj"))
    assert "lacks" in _refused(target, "no-module@v1")
    publish(s, "corrupt", good)
    r = s.redis.client()
    sha = BrokerClient(s.broker.target, TOKENS["client"]).get("corrupt@v1").sha256
    blob = r.get(f"ll:blob:{sha}")
    r.setrange(f"ll:blob:{sha}", len(blob) - 4, b"\x00\x01\x02\x03")  # flip bytes at rest
    assert "corrupt" in _refused(target, "corrupt@v1")
    r.setrange(f"ll:blob:{sha}", len(blob) - 4, blob[-4:])  # good bytes again: served (corruption is transient)
    r.close()
    assert generate(target, PROMPT, "corrupt@v1", max_tokens=2).versions == {("corrupt", 1)}

    # a followed adapter whose new version must be refused keeps serving the old one
    publish(s, "keep", good, fingerprint="sha256:" + "1" * 64)
    deadline = time.monotonic() + 30
    while not any(x.name == "keep" and x.version == 2 for x in list_adapters(target).refused):
        assert time.monotonic() < deadline, "keep@v2 was not refused"
        time.sleep(0.05)
    still = generate(target, PROMPT, "keep", max_tokens=8)
    assert still.versions == {("keep", 1)} and still.tokens == before.tokens
    refused = {(x.name, x.version): x.reason for x in list_adapters(target).refused}
    assert {("other-base", 1), ("big-rank", 1), ("no-module", 1), ("keep", 2)} <= set(refused)
    assert "trained on base" in refused[("keep", 2)]
    assert generate(target, PROMPT, "", max_tokens=2).versions == {("", 0)}  # base still served


def test_an_idle_engine_does_not_spin(rollout_stack):
    """vLLM's engine processes busy-wait 1 s after each message (its SpinCondition); on a 2-core
    machine that took a core from the broker and learner after every Generate. idle_spin bounds
    it (engine.idle_spin_ms, 50 ms): from 0.3 s to 1.3 s after a Generate the server's whole
    process tree must use well under that second of CPU (stock vLLM: ~0.7 s of it, one core
    spinning)."""
    s = rollout_stack
    pids = {s.rollout.proc.pid} | descendants(s.rollout.proc.pid)
    generate(s.rollout.target, PROMPT, max_tokens=2)
    time.sleep(0.3)
    before = cpu_seconds(pids)
    time.sleep(1.0)
    used = cpu_seconds(pids) - before
    assert used < 0.25, f"rollout server used {used:.2f} s of CPU in 1 s while idle"


def _latest(snap, name: str) -> int:
    return max((a.version for a in snap.adapters if a.name == name and a.latest), default=0)


def test_watch_adapters_reports_each_version_as_it_starts_serving(rollout_stack, tmp_path):
    """WatchAdapters: the current state at once, then a snapshot when a version loads on first
    use and when the follower hot-loads the next one (no request involved)."""
    s = rollout_stack
    watch = AdapterWatch(s.rollout.target)
    try:
        first = watch.until(lambda snap: True, timeout=30)
        assert _latest(first, "watched") == 0 and first.base_model_fingerprint == s.fingerprint
        publish(s, "watched", make_peft_adapter(s.model, tmp_path / "w1", seed=50))
        assert generate(s.rollout.target, PROMPT, "watched", max_tokens=2).versions == {("watched", 1)}
        watch.until(lambda snap: _latest(snap, "watched") == 1)
        publish(s, "watched", make_peft_adapter(s.model, tmp_path / "w2", seed=51))  # followed since first use
        snap = watch.until(lambda snap: _latest(snap, "watched") == 2)
        assert any(a.name == "watched" and a.version == 2 and a.followed for a in snap.adapters)
        assert generate(s.rollout.target, PROMPT, "watched", max_tokens=2).versions == {("watched", 2)}
    finally:
        watch.close()


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def test_the_model_runs_in_the_engine_core_process(rollout_stack):
    """engine.executor "auto" on the CPU build is "uni": vLLM's engine core runs the model itself,
    with no worker process beside it (vLLM's CPU default adds one: two shared-memory round trips
    and a busy wait per engine step), and its threads are bound as vLLM binds a worker's."""
    s = rollout_stack
    assert generate(s.rollout.target, PROMPT, max_tokens=2).tokens[0]
    names = {p: _comm(p) for p in descendants(s.rollout.proc.pid)}
    cores = [p for p, n in names.items() if n.startswith("VLLM::EngineCor")]
    assert len(cores) == 1, names
    assert not [n for n in names.values() if "Worker" in n], names
    allowed = os.sched_getaffinity(cores[0])  # its main thread: the model's OpenMP master
    machine = os.sched_getaffinity(0)
    if len(machine) > 1:
        assert allowed < machine, f"engine core not bound: may run on {sorted(allowed)}"


def test_text_decoded_once_is_the_text_vllm_streams(rollout_stack):
    """Leases ask vLLM for no text (it would also decode every log-prob's token) and decode each
    response once (TokenCodec.decode). That text must be what vLLM's own detokenizer streams."""
    from services.rollout.requests import TokenCodec

    codec = TokenCodec(str(rollout_stack.model))
    c = generate(rollout_stack.rollout.target, PROMPT, max_tokens=6, n=8, temperature=1.0)
    for k in range(8):
        streamed = "".join(m.text for m in c.msgs if m.index == k)
        assert codec.decode(c.tokens[k], PROMPT) == streamed, (k, c.tokens[k])
    assert any(codec.decode(t, PROMPT) for t in c.tokens)
