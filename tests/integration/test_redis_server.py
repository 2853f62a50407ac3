"""services.common.redis_server: the one redis-server command line every launcher uses. The
password lives in a 0600 file (never in argv, where `ps` shows it), and the server it starts
is what the broker requires (AOF, appendfsync always) and refuses clients without it."""

from __future__ import annotations

import stat
import subprocess

import pytest
import redis

from services.common import redis_server
from services.common.net import free_port
from services.common.proc import stop_process


def test_password_is_in_a_private_file_and_required(tmp_path):
    port, password = free_port(), "s3cret-not-in-argv"
    args = redis_server.command(port, tmp_path / "data", password=password, logfile=tmp_path / "r.log")
    assert all(password not in a for a in args)
    conf = tmp_path / "data" / "auth.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        redis_server.wait_ready(port, password=password, exited=lambda: proc.poll() is not None, timeout_s=15)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        r = redis.Redis(port=port, password=password)
        assert r.config_get("appendonly")["appendonly"] == "yes"
        assert r.config_get("appendfsync")["appendfsync"] == "always"
        assert r.config_get("save")["save"] == ""
        r.close()
    finally:
        stop_process(proc)


def test_wait_ready_gives_up_at_once_when_the_process_is_gone(tmp_path):
    port = free_port()
    args = [*redis_server.command(port, tmp_path, logfile=tmp_path / "r.log"), "--no-such-option", "x"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with pytest.raises(RuntimeError, match="did not start"):
        redis_server.wait_ready(port, exited=lambda: proc.poll() is not None, timeout_s=30)
    assert proc.poll() is not None
