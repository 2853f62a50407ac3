"""The stack's Supervisor restart policy with real processes (issue 19): a SIGKILLed service
comes back after its backoff with the same command, its scratch dir emptied; one that keeps
dying ends the run with its log tail after `max_restarts`; a service that finished (in `done`)
is left alone; every exit and restart is in logs/restarts.jsonl; stop_all leaves no process
and no scratch dir."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from services.stack import ServiceFailed, Supervisor
from services.stack_config import RestartConfig

SLEEPER = [sys.executable, "-c", "import os, time; print('up', os.environ['TMPDIR'], "
           "os.environ['TORCHINDUCTOR_CACHE_DIR'], flush=True); "
           "open(os.path.join(os.environ['TMPDIR'], 'scratch'), 'w').write('x'); time.sleep(120)"]
CRASHER = [sys.executable, "-c", "import sys; print('bad config: no such file', flush=True); sys.exit(3)"]


def _until(cond, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_a_killed_service_comes_back_after_its_backoff(tmp_path: Path):
    sup = Supervisor(tmp_path / "logs", RestartConfig(max_restarts=2, backoff_s=0.3, backoff_max_s=0.5),
                     scratch=tmp_path / "scratch")
    said: list[str] = []
    try:
        first = sup.start("svc", SLEEPER)
        _until(lambda: (tmp_path / "scratch" / "svc" / "scratch").exists())
        assert sup.supervise(say=said.append) == []  # alive: nothing to do
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        t_dead = time.monotonic()
        assert sup.supervise(say=said.append) == [] and "svc" in sup.due  # scheduled, not yet
        assert "restarting it in 0.3 s (restart 1 of at most 2)" in said[-1] and "code -9" in said[-1]
        assert _until(lambda: sup.supervise(say=said.append)) == ["svc"]
        assert time.monotonic() - t_dead >= 0.3
        second = sup.procs["svc"]
        assert second.pid != first.pid and second.poll() is None and sup.total_restarts == 1
        # the scratch dir was emptied for the new process, which made its own file again
        _until(lambda: (tmp_path / "scratch" / "svc" / "scratch").exists())
        log = (tmp_path / "logs" / "svc.log").read_text()
        assert log.count("up ") == 2
        # torch's compiled-kernel cache stays where it always is, not in the emptied scratch dir
        assert str(tmp_path / "scratch") not in log.splitlines()[0].split()[2]
        events = [json.loads(x) for x in (tmp_path / "logs" / "restarts.jsonl").read_text().splitlines()]
        assert [(e["service"], e["event"]) for e in events] == [("svc", "exited"), ("svc", "restarted")]
        assert events[0]["code"] == -9 and events[1]["pid"] == second.pid
    finally:
        sup.stop_all()
    assert sup.procs["svc"].poll() is not None and not (tmp_path / "scratch").exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(sup.procs["svc"].pid, 0)


def test_a_service_that_keeps_dying_ends_the_run_with_its_log_tail(tmp_path: Path):
    sup = Supervisor(tmp_path / "logs", RestartConfig(max_restarts=2, backoff_s=0.05, backoff_max_s=0.1))
    said: list[str] = []
    try:
        sup.start("broker", CRASHER)
        with pytest.raises(ServiceFailed) as e:
            _until(lambda: sup.supervise(say=said.append) and False)
        msg = str(e.value)
        assert "broker exited with code 3" in msg and "restarted 2 time(s)" in msg
        assert "bad config: no such file" in msg  # the log tail
        assert sup.restarts["broker"] == 2
        assert sum("restarting it" in s for s in said) == 2
        events = [json.loads(x)["event"] for x in (tmp_path / "logs" / "restarts.jsonl").read_text().splitlines()]
        assert events == ["exited", "restarted", "exited", "restarted", "gave_up"]
    finally:
        sup.stop_all()


def test_a_finished_service_is_left_alone(tmp_path: Path):
    sup = Supervisor(tmp_path / "logs", RestartConfig(max_restarts=1, backoff_s=0.0))
    try:
        p = sup.start("learner", [sys.executable, "-c", "pass"])
        p.wait(20)
        for _ in range(3):
            assert sup.supervise({"learner"}) == []
        assert sup.total_restarts == 0 and not sup.due
    finally:
        sup.stop_all()


def test_max_restarts_zero_ends_the_run_at_the_first_death(tmp_path: Path):
    sup = Supervisor(tmp_path / "logs", RestartConfig(max_restarts=0))
    try:
        sup.start("redis", CRASHER).wait(20)
        with pytest.raises(ServiceFailed, match="redis exited with code 3"):
            sup.supervise()
    finally:
        sup.stop_all()
