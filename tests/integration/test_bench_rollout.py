"""`loraloop bench rollout --quick` runs end to end (in-process vLLM CPU engine, real Redis, broker
and rollout server) and writes every figure it prints. No speed is asserted: this checks the
benchmark, not the engine."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_bench_help_lists_rollout() -> None:
    top, sub = _run("--help"), _run("rollout", "--help")
    assert top.returncode == 0 and "rollout" in top.stdout
    assert sub.returncode == 0 and "--quick" in sub.stdout


def test_bench_rollout_quick_writes_figures(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    proc = _run("rollout", "--quick", "--out", str(out), timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "one/base" in proc.stdout and "(a) served" in proc.stdout and "(b) served" in proc.stdout

    result = json.loads(out.read_text())
    assert {"machine", "config", "goals", "throughput", "hotload"} <= result.keys()
    m = result["machine"]
    assert m["nproc"] > 0 and m["python"] and m["vllm"] and m["torch"]
    c = result["config"]
    assert (c["seqs"], c["tokens"], c["mixed"], c["hotloads"]) == (16, 32, 2, 3)  # --quick

    [t] = result["throughput"]  # --quick: tiny model only
    assert t["model"] == "tiny" and t["engine_start_s"] > 0 and t["warmup_s"] > 0
    for cond in ("base", "one", "mixed"):
        assert t[cond]["tok_s"] > 0 and len(t[cond]["runs_tok_s"]) == 1, cond
    assert t["one_over_base"] == t["one"]["tok_s"] / t["base"]["tok_s"]
    assert t["mixed_over_one"] == t["mixed"]["tok_s"] / t["one"]["tok_s"]

    [h] = result["hotload"]
    assert h["model"] == "tiny" and h["loads"] == 3 and len(h["samples"]) == 3 and h["adapter_bytes"] > 0
    for key in ("served_ms", "floor_ms", "served_from_ack_ms", "floor_with_first_token_ms"):
        assert 0 < h[key]["p50"] <= h[key]["p95"], key
    for part in ("publish_call", "visible", "fetch", "add_lora", "inproc_first_token"):
        assert h["parts_ms"][part]["p50"] > 0, part
    for s in h["samples"]:
        # Served is measured from the same instant as visible, and comes after it.
        assert s["served"] >= s["visible"] >= s["publish_call"] > 0
        assert s["floor"] == s["fetch"] + s["add_lora"]
        assert s["served_from_ack"] == s["served"] - s["publish_call"] > 0
        assert s["floor_with_first_token"] == s["fetch"] + s["add_lora"] + s["inproc_first_token"]
    ideal = statistics.median(s["floor_with_first_token"] / s["floor"] for s in h["samples"])
    assert h["ideal_ratio_a_p50"] == ideal > 1 and "ideal (a)" in proc.stdout
    assert [s["version"] for s in h["samples"]] == sorted({s["version"] for s in h["samples"]})
    assert set(result["goals"]["met"]) == {"one_over_base", "mixed_over_one", "hotload_ratio",
                                           "hotload_from_ack_ratio"}
