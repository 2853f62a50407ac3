"""`loraloop bench rollout` starts its rollout server on a port picked ~1 min before the server
binds it (the engine starts first): a bind failure tries another port, any other failure does not.
The server process and the health check are stand-ins here (the bench runs the real ones)."""

from __future__ import annotations

import pytest

from services.bench import rollout as bench
from services.common import net


class FakeProc:
    def __init__(self, code):
        self.code = code

    def poll(self):
        return self.code


@pytest.fixture
def started(monkeypatch, tmp_path):
    """Each Popen writes the next scripted log line to the server's log; a line with "exit" dies."""
    script: list[str] = []
    ports = iter(range(40001, 40010))
    calls: list[int] = []
    cmds: list[list[str]] = []

    def popen(cmd, env, stdout, stderr):
        cmds.append(cmd)
        line = script.pop(0)
        stdout.write(line.encode())
        stdout.flush()
        calls.append(int(cmd[cmd.index("--port") + 1]))
        return FakeProc(1 if "exit" in line else None)

    def wait_healthy(target, timeout_s, still_alive):
        reason = still_alive()
        if reason:
            raise RuntimeError(reason)

    monkeypatch.setattr(net, "free_port", lambda: next(ports))
    monkeypatch.setattr(net, "wait_healthy", wait_healthy)
    monkeypatch.setattr(bench.subprocess, "Popen", popen)
    monkeypatch.setattr(bench, "stop_process", lambda proc: None)

    def start(*lines, **kw):
        script.extend(lines)
        return bench.start_rollout(tmp_path, "b:1", {"rollout": "t"}, tmp_path, tmp_path, **kw), calls

    start.cmds = cmds
    return start



def test_a_port_taken_before_the_server_binds_it_is_replaced(started):
    (proc, target), calls = started("exit: Failed to bind to address 127.0.0.1:40001\n", "serving\n")
    assert target == "127.0.0.1:40002" and calls == [40001, 40002] and proc.poll() is None


def test_bind_failures_stop_after_the_last_attempt(started):
    with pytest.raises(SystemExit, match="did not start"):
        started(*["exit: Failed to bind to address\n"] * bench.BIND_ATTEMPTS)


def test_any_other_failure_is_not_retried(started):
    with pytest.raises(SystemExit, match="bad model"):
        started("exit: bad model\n", "serving\n")


def test_the_served_engine_gets_the_floor_engines_settings(started):
    """The hot-load floor runs in-process on engine_config(...); the server must run the same
    engine (a float32 server against a bfloat16 floor made the served side slower for nothing)."""
    from services.common.config import load_config, parse_overrides
    from services.rollout.config import ALIASES, RolloutConfig

    cfg = bench.engine_config(bench.Path("/m"), "0.5b", seqs=64, tokens=128, mixed=8)
    flags = bench.engine_flags(cfg)
    served = load_config(RolloutConfig, None, parse_overrides(["--model=/m", *flags], ALIASES)).engine
    assert served == cfg and served.dtype == "bfloat16"
    started("serving\n", engine=flags)
    assert all(f in started.cmds[-1] for f in flags)
