"""`loraloop bench learner --quick` runs end to end (each setup in its own process) and writes
every figure it prints. No speed or memory is asserted: this checks the benchmark, not the
learner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_bench_help_lists_learner() -> None:
    top, sub = _run("--help"), _run("learner", "--help")
    assert top.returncode == 0 and "learner" in top.stdout
    assert sub.returncode == 0 and "--quick" in sub.stdout
    for opt in ("--grad-ckpt", "--malloc", "--micro-batch"):
        assert opt in sub.stdout


def test_bench_learner_quick_writes_figures(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    proc = _run("learner", "--quick", "--out", str(out), timeout=300)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "lora/full" in proc.stdout and "peak MB" in proc.stdout

    result = json.loads(out.read_text())
    assert {"benchmark", "machine", "config", "goals", "results"} <= result.keys()
    m = result["machine"]
    assert m["nproc"] > 0 and m["mem_bytes"] > 0 and m["torch"] and m["transformers"] and m["peft"]
    c = result["config"]
    assert (c["models"], c["steps"], c["kl_coef"]) == (["tiny"], 2, 0.01)  # --quick
    # Defaults: no checkpointing, the releasing malloc environment, each model's own micro-batch.
    assert (c["gradient_checkpointing"], c["malloc"], c["micro_batch"]) == (False, "release", None)
    assert c["malloc_env"]["MALLOC_MMAP_THRESHOLD_"] == str(4 << 20)
    assert "settings (both setups): gradient checkpointing off; malloc release" in proc.stdout
    assert result["goals"]["lora_over_full_peak_max"] == 0.6

    [r] = result["results"]
    assert r["model"] == "tiny" and r["dtype"] == "float32"
    lora, full = r["lora"], r["full"]
    for x in (lora, full):
        assert x["tok_s"] > 0 and x["step_s_median"] > 0 and x["warmup_s"] > 0 and x["load_s"] > 0
        assert len(x["step_s"]) == len(x["cpu_s"]) == len(x["runs_tok_s"]) == 2
        assert all(v > 0 for v in x["runs_tok_s"] + x["cpu_s"]) and x["cpu_s_median"] > 0
        assert x["tokens_per_update"] == 64 * 8 and x["threads"] >= 1
        mem = x["mem_mb"]
        assert 0 < mem["baseline_rss"] <= mem["peak"] and mem["peak_delta"] > 0
        assert mem["peak_delta"] == mem["peak"] - mem["baseline_rss"]
        assert mem["machine_available_min"] > 0 and mem["end_rss_anon"] > 0
        # The peak covers loading and training; VmHWM is reset in between (Linux allows it here).
        assert mem["hwm_reset"] and mem["peak"] == max(mem["load_peak"], mem["train_peak"])
        assert mem["peak_set_by"] in ("training", "loading")
        assert mem["at_sampled_peak"]["anon"] > 0 and mem["at_sampled_peak"]["file"] > 0
        # The measured process really ran with the settings the driver reports.
        assert x["malloc_env"] == c["malloc_env"] and x["gradient_checkpointing"] is False
        assert x["includes"]["gradient_checkpointing"] is False
    assert "adapter disabled" in lora["includes"]["reference"] and "second" in full["includes"]["reference"]
    # LoRA trains only its adapter; full fine-tuning trains every base parameter.
    assert 0 < lora["trainable_params"] < full["trainable_params"] == full["base_params"] == lora["base_params"]
    # Same update math: both start from the base, so the warm-up update's loss is the same.
    assert abs(lora["first_update"]["loss"] - full["first_update"]["loss"]) < 1e-5
    assert r["peak_ratio"] == lora["mem_mb"]["peak"] / full["mem_mb"]["peak"]
    assert r["tok_s_ratio"] == lora["tok_s"] / full["tok_s"]
    assert r["goal_met"] is None  # tiny is exempt: the runtime is its whole peak


def test_bench_learner_settings_reach_both_setups(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    proc = _run("learner", "--quick", "--grad-ckpt", "--malloc", "glibc", "--micro-batch", "16", "--out", str(out),
                timeout=300)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "gradient checkpointing on; malloc glibc (no MALLOC_* variables); micro-batch 16" in proc.stdout
    result = json.loads(out.read_text())
    c = result["config"]
    assert (c["gradient_checkpointing"], c["malloc"], c["malloc_env"], c["micro_batch"]) == (True, "glibc", {}, 16)
    [r] = result["results"]
    assert r["workload"]["micro_batch"] == 16
    for s in ("lora", "full"):
        assert r[s]["gradient_checkpointing"] is True and r[s]["malloc_env"] == {}
    # Micro-batching and checkpointing leave the update's math alone.
    assert abs(r["lora"]["first_update"]["loss"] - r["full"]["first_update"]["loss"]) < 1e-5


def test_bench_publish_quick_gathers_the_lora_tensors_only(tmp_path):
    """The publish bench on the tiny shape, 1 and 2 ranks, with and without FSDP2 CPU offload
    (its code path on CPU: unpinned): every setting runs, and the adapter gathered for a publish
    is the LoRA tensors alone (a small part of the full state dict)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "publish.json"
    proc = subprocess.run([sys.executable, "-m", "services.cli", "bench", "publish", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [(s["ranks"], s["offload"]) for s in r["settings"]] == [(1, False), (2, False), (1, True), (2, True)]
    for s in r["settings"]:
        assert "error" not in s, s.get("error")
        assert len(s["per_rank"]) == s["ranks"]
        for pr in s["per_rank"]:
            assert 0 < pr["adapter_mb"] < pr["full_state_mb"] / 2
