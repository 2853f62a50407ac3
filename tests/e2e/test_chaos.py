"""`loraloop chaos` (issue 19): the demo with 2 replicas while the broker, Redis, the learner
and a replica are SIGKILLed in turn and OpenAI clients keep querying; the stack's supervisor
brings each back, and every check of the run passes (steps, reward, versions, groups, requests,
processes, scratch files)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.procs import run_cli


def test_chaos_run_loses_nothing(tmp_path: Path):
    run = tmp_path / "chaos"
    # 200 steps (the command's default is 300): the four kills are over by about step 100.
    out = run_cli(["chaos", "--seed=1", "--clients=2", "--steps=200", f"--run-dir={run}"], timeout=1500)
    tail = "\n".join(line for line in (out.stdout + out.stderr).replace("\r", "\n").splitlines()
                     if not line.startswith("training"))[-6000:]
    assert out.returncode == 0, tail
    report = json.loads((run / "chaos.json").read_text())
    assert [c["name"] for c in report["checks"] if not c["ok"]] == [], tail
    kills = report["kills"]
    assert [k["kind"] for k in kills] == ["broker", "redis", "learner", "rollout"]
    assert all(k["time"] and k["back_after_s"] > 0 for k in kills), kills
    events = [json.loads(x) for x in (run / "logs" / "restarts.jsonl").read_text().splitlines()]
    restarted = {e["service"] for e in events if e["event"] == "restarted"}
    assert {"broker", "redis", "learner"} <= restarted and any(s.startswith("rollout-") for s in restarted)
    figures = report["figures"]
    assert figures["epochs"] >= 2  # the restarted learner took a new publisher epoch
    assert figures["requests"]["total"] > 0 and figures["requests"]["wrong_version"] == 0
    assert "chaos: every check passed" in out.stdout
