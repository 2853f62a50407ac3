"""`loraloop up` brings Redis + broker up, serves, and stops every process it started."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from services.broker.client import BrokerClient


def _env_file(path):
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_up_serves_then_stops_everything(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--run-dir", str(run_dir),
                             "--duration", "60"], stdout=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "Ctrl-C stops everything" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "loraloop up exited early"
        env = _env_file(run_dir / "stack.env")
        tokens = dict(p.split(":", 1) for p in env["LORALOOP_TOKENS"].split(","))
        with BrokerClient(env["LORALOOP_BROKER"], tokens["learner"]) as c:
            epoch, latest = c.acquire_publisher("up-test")
            assert (epoch, latest) == (1, 0)
        pids = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                 text=True).stdout.split()]
        assert len(pids) == 2  # redis-server and the broker
        proc.send_signal(2)  # Ctrl-C
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "stack stopped" in out
        for pid in pids:
            assert not os.path.exists(f"/proc/{pid}"), f"pid {pid} still running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
