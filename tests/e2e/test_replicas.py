"""Scaling replicas (issue 5, point 3): a rollout started by hand joins a running stack and
shares the work; the run completes and every process ends. A replica SIGKILLed mid-run, its
replacement and the sweep of its scratch files: tests/e2e/test_chaos.py (`loraloop chaos`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from services.common import events
from services.common.proc import stop_process
from services.learner.metrics import read_metrics
from services.rollout.adapters import ADAPTER_LOADED
from tests.support.proctree import alive, descendants, scratch_dirs

# Both replicas start their engines at about the same time; 150 steps (~40-70 s of training)
# leave the hand-started one time to take part after it catches up.
STEPS = 150


def _env_file(path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_add_a_replica_by_hand_run_completes(tmp_path):
    run = tmp_path / "run"
    up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--run-dir", str(run), "--steps", str(STEPS),
                           "--learner.data.lease_deadline_s=5"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    extra = None
    try:
        deadline = time.monotonic() + 900
        while not (run / "stack.env").exists():  # the stack is up (broker, learner serving)
            assert up.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        env = _env_file(run / "stack.env")
        # A replica started by hand, from the stack's own rollout.toml.
        extra_log = open(tmp_path / "extra-rollout.log", "wb")  # noqa: SIM115
        extra = subprocess.Popen([sys.executable, "-m", "services.cli", "rollout", str(run / "rollout.toml"),
                                  "--port", "0", "--worker_id=by-hand"],
                                 env={**os.environ, "LORALOOP_TOKEN": env["LORALOOP_ROLLOUT_TOKEN"],
                                      "LORALOOP_TOKENS": f"client:{env['LORALOOP_CLIENT_TOKEN']}",
                                      "VLLM_CPU_OMP_THREADS_BIND": "1"},
                                 stdout=extra_log, stderr=subprocess.STDOUT)
        while not [e for e in events.read_file(tmp_path / "extra-rollout.log", ADAPTER_LOADED)
                   if e["name"] == "policy"]:  # caught up
            assert extra.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        seen = descendants(up.pid)  # includes the replica's vLLM engine processes
        while up.poll() is None:
            seen |= descendants(up.pid)
            assert time.monotonic() < deadline
            time.sleep(1)
        out = up.stdout.read()
        assert up.returncode == 0, out[-3000:]
        assert not [p for p in seen if alive(p)], "processes left running (orphaned engines?)"
        assert not scratch_dirs(seen | {up.pid}), scratch_dirs(seen | {up.pid})
    finally:  # on a failure: `up` stops what it started on SIGTERM (SIGKILL would orphan it)
        stop_process(up, timeout_s=90)
        if extra is not None:
            tree = descendants(extra.pid)
            extra.send_signal(signal.SIGTERM)
            extra.wait(60)
            grace = time.monotonic() + 15  # the engine's own processes end just after it
            while any(alive(p) for p in tree) and time.monotonic() < grace:
                time.sleep(0.2)
            assert not [p for p in tree if alive(p)], "processes left running"
            assert not scratch_dirs(tree | {extra.pid}), "scratch dirs left behind"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    text = (tmp_path / "extra-rollout.log").read_text()
    done = [line for line in text.splitlines() if "rollout worker done: " in line]
    assert done, "the hand-started replica did not report"
    stats = json.loads(done[-1].split("rollout worker done: ", 1)[1])
    assert stats["groups_submitted"] > 0, "the hand-started replica did no work"
