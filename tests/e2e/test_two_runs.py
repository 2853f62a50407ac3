"""Two runs on one fleet through the real CLI (issue 16): `loraloop up examples/two-runs.toml`
starts two learners (adapters add-r16 and add-r8, different ranks and target modules) and a
replica that leases from both; each run trains in its own run dir; the replica's rollout.toml
names both learners; the OpenAI API serves both adapters while they train; every process
stops. (Learning itself over 200-400 steps is shown by the README's figures; this run is short.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from services.common.proc import stop_process
from services.learner.metrics import read_metrics
from tests.support.proctree import alive, descendants

STEPS = 20
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "two-runs.toml"


def test_two_runs_train_on_one_replica_and_stop(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", str(EXAMPLE), "--run-dir", str(run),
                             "--learner.steps", str(STEPS), "--rollout-replicas", "1", "--plot=false"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen: set[int] = set()
        served: dict[str, str] = {}
        deadline = time.monotonic() + 600
        while proc.poll() is None:
            seen |= descendants(proc.pid)
            if not served and all(len(read_metrics(run / a)) >= 2 for a in ("add-r16", "add-r8")):
                served = _query_both(run)
            assert time.monotonic() < deadline, "two short runs did not finish in 10 minutes"
            time.sleep(0.5)
    finally:  # a failure above: `up` stops its services on SIGTERM
        if proc.poll() is None:
            stop_process(proc, timeout_s=90)
    out = proc.stdout.read()
    assert proc.returncode == 0, out[-3000:]
    assert "every process stopped" in out and not [p for p in seen if alive(p)], "processes left running"
    for adapter in ("add-r16", "add-r8"):
        rows = read_metrics(run / adapter)
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), adapter
        assert all(r["policy_version"] - 1 - r["rollout/version_min"] <= 1 for r in rows)  # its own bound
        assert f"{adapter}: done: {STEPS} steps" in out
    summary = json.loads((run / "summary.json").read_text())["runs"]
    assert set(summary) == {"add-r16", "add-r8"} and all(s["steps"] == STEPS for s in summary.values())
    # The replica's config names both learners with their weights; a replica started by hand
    # from it would lease from both.
    rollout = tomllib.loads((run / "rollout.toml").read_text())
    learners = {line.split("=", 1)[1] for line in (run / "stack.env").read_text().splitlines()
                if line.startswith("LORALOOP_LEARNERS=")}.pop().split(",")
    assert sorted(t["address"] for t in rollout["learners"]) == sorted(x.split("=", 1)[1] for x in learners)
    assert rollout["learner"] == "" and sorted(rollout["adapters"]["follow"]) == ["add-r16", "add-r8"]
    # While both trained, the OpenAI API answered each adapter at a version of its own.
    assert served["add-r16"].startswith("add-r16@v") and served["add-r8"].startswith("add-r8@v"), served


def _query_both(run) -> dict[str, str]:
    import openai

    env = dict(line.split("=", 1) for line in (run / "stack.env").read_text().splitlines() if "=" in line)
    c = openai.OpenAI(base_url=env["OPENAI_BASE_URL"], api_key=env["OPENAI_API_KEY"], max_retries=5)
    return {a: c.completions.create(model=f"{a}@latest", prompt="3+8=", max_tokens=3).model
            for a in ("add-r16", "add-r8")}
