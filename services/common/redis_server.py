"""redis-server as the broker requires it, started the same way by every launcher.

`loraloop up`, the benches, the Ray actors and the tests all start their own Redis; this
module is the one place its command line is written: AOF with `appendfsync always` (the
broker acknowledges a publish only once Redis made it durable), no RDB snapshots, loopback
unless told otherwise. A password goes in a 0600 config file, never on the command line
where `ps` shows it to every user.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path


def require() -> None:
    """Fail with the install hint when redis-server is not on PATH."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server not found (Debian: apt-get install redis-server)")


def command(port: int, data_dir: Path | str, *, host: str = "127.0.0.1", password: str | None = None,
            logfile: Path | str | None = None) -> list[str]:
    """The argv of a durable redis-server with its data (AOF) in `data_dir`.

    With a password, `data_dir/auth.conf` (mode 0600) holds `requirepass` and is the first
    argument, so a restart with the same argv keeps the same password.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    args = ["redis-server"]
    if password is not None:
        conf = data_dir / "auth.conf"
        conf.touch(mode=0o600)
        conf.chmod(0o600)
        conf.write_text(f"requirepass {password}\n")
        args.append(str(conf))
    args += ["--port", str(port), "--bind", host, "--dir", str(data_dir), "--appendonly", "yes",
             "--appendfsync", "always", "--save", "", "--daemonize", "no"]
    if logfile is not None:
        args += ["--logfile", str(logfile)]
    return args


def wait_ready(port: int, *, host: str = "127.0.0.1", password: str | None = None,
               exited: Callable[[], bool] = lambda: False, timeout_s: float = 30.0,
               what: str = "redis-server") -> None:
    """Block until Redis answers PING; raise RuntimeError at once if `exited()` says its
    process is gone, or once `timeout_s` has passed."""
    import redis

    client = redis.Redis(host=host, port=port, password=password, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            if exited() or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start on {host}:{port}")
            time.sleep(0.05)
    finally:
        client.close()
