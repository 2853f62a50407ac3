"""Scaling replicas (issue 5, point 3): a rollout started by hand joins a running stack and
shares the work; another replica is killed; the run completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from services.common import events
from services.learner.metrics import read_metrics
from services.rollout.adapters import ADAPTER_LOADED
from tests.support.proctree import alive, descendants, scratch_dirs

# Long enough for the killed replica's replacement to start (its engine start sweeps the
# victim's scratch dirs) before the run ends: under CI's load it took over 2 minutes, and at
# ~0.45 s a step 200 steps left it ~90 s (the replacement was stopped mid-start).
STEPS = 400


def _env_file(path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_add_a_replica_kill_another_run_completes(tmp_path):
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
        while len(read_metrics(run)) < 20:  # training under way, both replicas at work
            assert up.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        # The victim is a serving replica (the hand-started one can carry training alone while
        # the stack's own is still starting its engine).
        while "loraloop rollout listening" not in (run / "logs" / "rollout-0.log").read_text(errors="replace"):
            assert up.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        # Kill the original replica (SIGKILL, by its pid): `up` replaces it, its leases are re-issued.
        pids = json.loads((run / "logs" / "pids.json").read_text())
        victim = pids["rollout-0"]
        seen = descendants(up.pid)  # includes the victim's vLLM engine processes
        os.kill(victim, signal.SIGKILL)
        while up.poll() is None:
            seen |= descendants(up.pid)
            assert time.monotonic() < deadline + 900
            time.sleep(1)
        out = up.stdout.read()
        assert up.returncode == 0, out[-3000:]
        assert "rollout-0 exited (code -9" in out and "restarting it in" in out and "rollout-0 restarted" in out
        assert not [p for p in seen if alive(p)], "processes left running (orphaned engines?)"
        # The victim's adapter cache (RAM) and vLLM socket dir are swept by its replacement;
        # every other replica removed its own at exit.
        assert victim in seen and not scratch_dirs(seen | {up.pid}), scratch_dirs(seen | {up.pid})
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
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
