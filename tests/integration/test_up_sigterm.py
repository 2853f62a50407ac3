"""`loraloop up` stopped by SIGTERM (kill, systemd, docker stop, a CI timeout) stops every service
it started, as Ctrl-C does, and removes its scratch root; before this, SIGTERM ended `up` alone
and left Redis, the broker and the learner running (issue 19)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.proctree import alive


def test_sigterm_stops_the_whole_stack(tmp_path: Path, tiny_model: Path):
    run = tmp_path / "run"
    # No replica: Redis, the broker and the learner start (no vLLM), the learner waits for work.
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", f"--run-dir={run}", f"--model={tiny_model}",
                             "--warm_start=false", "--rollout-replicas=0", "--steps=5", "--plot=false"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids_file = run / "logs" / "pids.json"
    try:
        deadline = time.monotonic() + 120
        while not (pids_file.exists() and "learner" in json.loads(pids_file.read_text() or "{}")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        time.sleep(3)  # inside follow_progress
        pids = json.loads(pids_file.read_text())
        assert all(alive(p) for p in pids.values()), pids
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pids['learner']}/environ").read_text().split("\0")
                   if "=" in kv)
        scratch_root = Path(env["TMPDIR"]).parent
        assert scratch_root.name.startswith("ll-") and len(env["TMPDIR"]) < 40
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert "stopping ..." in out
    assert not [n for n, p in pids.items() if alive(p)], out[-3000:]
    assert not scratch_root.exists()  # the scratch root goes with the stack
