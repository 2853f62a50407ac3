"""`loraloop bench broker --quick` runs end to end (real Redis, real broker) and writes every
figure it prints. No speed is asserted: this checks the benchmark, not the broker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_bench_help_lists_broker() -> None:
    top, sub = _run("--help"), _run("broker", "--help")
    assert top.returncode == 0 and "broker" in top.stdout
    assert sub.returncode == 0 and "--quick" in sub.stdout


def test_bench_broker_quick_writes_figures(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    proc = _run("broker", "--quick", "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "publish+fetch" in proc.stdout and "p99" in proc.stdout

    result = json.loads(out.read_text())
    assert {"machine", "config", "goals", "throughput", "watch"} <= result.keys()
    m = result["machine"]
    assert m["nproc"] > 0 and m["python"] and m["redis_version"]

    [size] = result["throughput"]  # --quick: 1 MB only
    assert size["size_mb"] == 1 and size["bytes"] > 0 and size["repeats"] == 1
    for leg in ("publish", "fetch", "publish_fetch"):
        for key in ("broker_s", "floor_s", "broker_mb_s", "floor_mb_s", "ratio"):
            assert size[leg][key] > 0, (leg, key)

    w = result["watch"]
    assert w["watchers"] == 8 and w["publishes"] == 10 and w["events"] == 8 * 10
    assert w["from_call_ms"]["p50"] > 0 and w["from_call_ms"]["p99"] >= w["from_call_ms"]["p50"]
    # From the ack a watcher may hear first (negative); only order is checked.
    assert w["from_ack_ms"]["p99"] >= w["from_ack_ms"]["p50"]
    assert set(result["goals"]["met"]) == {"publish_fetch_ratio", "watch_p99"}
