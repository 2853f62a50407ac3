"""Stopping a child process by its pid: the one way launchers, benches and tests do it."""

from __future__ import annotations

import signal
import subprocess


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
    """Send `sig` to this one process (by its pid), wait up to `timeout_s`, then SIGKILL it."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
