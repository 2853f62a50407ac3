"""`loraloop bench peers --quick`: the real stack and, where its venv can be built in time,
TRL in a venv of its own, on the same model and prompts, a few steps each (issue 17's CI
smoke; the full run is for docs/benchmarks-notes.md).

The peer's venv needs PyPI (trl 1.16 is not on this machine's local index); where it cannot
be built the bench says so and our side is still checked."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_peers_quick(tmp_path):
    out = tmp_path / "peers.json"
    proc = subprocess.run([sys.executable, "-m", "services.cli", "bench", "peers", "--quick",
                           "--work-dir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=1500)
    print(proc.stdout[-4000:], proc.stderr[-3000:])
    assert proc.returncode == 0
    res = json.loads(out.read_text())
    ours = res["loraloop"]
    assert ours["steps"] == 12 and 0 < ours["s_per_step"] < 10
    assert 0 <= ours["reward_last5"] <= 1 and ours["peak_tree_rss_mb"] > 100  # the stack's processes
    assert "first step" in ours["first_step_line"]
    table = res["comparison"]["table"]
    assert "s/step (median)" in proc.stdout
    floor = res["floor"]  # vLLM alone generating one batch: 5 timed rounds in --quick
    assert floor["rounds"] == 5 and floor["sequences_per_batch"] == 256 and 0 < floor["median_s"] < 10
    assert 256 <= floor["tokens_per_batch"] <= 256 * 3 and "rollout floor (vLLM alone" in proc.stdout
    if "skipped" in res["trl"]:
        print(f"TRL peer skipped: {res['trl']['skipped']}")
        assert "TRL: skipped" in proc.stdout and set(table) == {"loraloop"}
    else:
        trl = res["trl"]
        assert trl["steps"] == 12 and 0 < trl["s_per_step"] < 10 and 0 <= trl["reward_last5"] <= 1
        assert trl["peak_tree_rss_mb"] > 100 and trl["versions"]["trl"] == "1.16.0"
        assert set(table) == {"loraloop", "trl"}
        # Same model, prompts and reward: the two starts agree within sampling noise.
        assert abs(ours["reward_first20"] - trl["reward_first20"]) < 0.15
