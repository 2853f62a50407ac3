"""`loraloop up`: the local stack as processes on this machine.

Today: redis-server (own port, data dir and password under the run dir, AOF fsync always)
and the broker. Rollout and learner join as their issues land. Every process is started
and stopped by pid; logs go to <run_dir>/logs/.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Supervisor:
    """Starts named processes, checks they stay up, stops them all (reverse order) by pid."""

    log_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)  # Ctrl-C reaches us, not the children
        self.procs[name] = proc
        return proc

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError(f"{name} exited with code {p.returncode}; last log lines:\n" + "\n".join(tail))

    def stop_all(self, timeout_s: float = 10.0) -> None:
        for _name, p in reversed(list(self.procs.items())):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


def _wait(what: str, probe, sup: Supervisor, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        sup.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout_s:.0f}s (logs in {sup.log_dir})")
        time.sleep(0.1)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loraloop up",
        description="Bring the local loraloop stack up as processes on this machine: redis-server "
        "(AOF, password) and the broker; stops everything on Ctrl-C or after --duration.",
    )
    p.add_argument("config", nargs="?", help="stack config (TOML); none yet: reserved for the demo run")
    p.add_argument("--run-dir", default="runs/local", help="where logs, Redis data and tokens go (default runs/local)")
    p.add_argument("--broker-port", type=int, default=0, help="broker port (default: a free one)")
    p.add_argument("--duration", type=float, default=None,
                   help="stop after this many seconds (default: run until Ctrl-C)")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    if shutil.which("redis-server") is None:
        print("loraloop up: redis-server not found (Debian: apt-get install redis-server)", file=sys.stderr)
        return 1
    sup = Supervisor(run_dir / "logs")
    redis_port, broker_port = free_port(), args.broker_port or free_port()
    password = secrets.token_hex(16)
    tokens = {role: secrets.token_urlsafe(24) for role in ("learner", "rollout", "client")}
    (run_dir / "redis").mkdir(parents=True, exist_ok=True)
    env_file = run_dir / "stack.env"
    env_file.write_text(
        f"LORALOOP_BROKER=127.0.0.1:{broker_port}\n"
        f"LORALOOP_TOKENS={','.join(f'{r}:{t}' for r, t in tokens.items())}\n"
        f"LORALOOP_TOKEN={tokens['learner']}\n"
    )
    env_file.chmod(0o600)
    env = {**os.environ, "LORALOOP_TOKENS": ",".join(f"{r}:{t}" for r, t in tokens.items()),
           "LORALOOP_REDIS_PASSWORD": password}
    try:
        import redis

        sup.start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                            "--dir", str(run_dir / "redis"), "--appendonly", "yes", "--appendfsync", "always",
                            "--save", "", "--requirepass", password])
        r = redis.Redis(port=redis_port, password=password, socket_connect_timeout=0.5)

        def redis_up() -> bool:
            try:
                return bool(r.ping())
            except redis.RedisError:
                return False

        _wait("redis", redis_up, sup)
        sup.start("broker", [sys.executable, "-m", "services.cli", "broker", "--port", str(broker_port),
                             "--redis-url", f"redis://127.0.0.1:{redis_port}/0"], env=env)
        from services.broker.client import BrokerClient

        with BrokerClient(f"127.0.0.1:{broker_port}", tokens["client"]) as c:
            c.wait_ready(60)
        print(f"loraloop stack up in {run_dir}\n  broker  127.0.0.1:{broker_port}\n  redis   127.0.0.1:{redis_port}"
              f" (password in the broker's environment only)\n  tokens  {env_file}  (source it to use"
              " `loraloop adapters ...`)\n  logs    {sup.log_dir}/\nCtrl-C stops everything.", flush=True)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        while deadline is None or time.monotonic() < deadline:
            sup.check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    except RuntimeError as e:
        print(f"loraloop up: {e}", file=sys.stderr)
        return 1
    finally:
        sup.stop_all()
    print("stack stopped", flush=True)
    return 0
