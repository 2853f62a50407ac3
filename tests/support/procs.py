"""Processes the tests own: a real redis-server and a real `loraloop broker`, each started
on a free loopback port and stopped by pid (never by name)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from services.common import redis_server
from services.common.net import free_port, wait_healthy
from services.common.proc import stop_process

TOKENS = {"learner": "tok-learner", "rollout": "tok-rollout", "client": "tok-client"}
TOKENS_ENV = ",".join(f"{role}:{tok}" for role, tok in TOKENS.items())


class RedisProc:
    """redis-server with AOF and appendfsync always, data in `dir`, restartable in place."""

    def __init__(self, workdir: Path) -> None:
        redis_server.require()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = redis_server.command(self.port, self.dir, logfile=self.dir / "redis.log")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            redis_server.wait_ready(self.port, exited=lambda: self.proc.poll() is not None, timeout_s=15)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; see {self.dir / 'redis.log'}") from None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def kill(self) -> None:
        """SIGKILL: no shutdown save, only what the AOF already holds survives."""
        stop_process(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        stop_process(self.proc)

    def restart(self, hard: bool = True) -> None:
        self.kill() if hard else self.stop()
        self.start()


class BrokerProc:
    """`loraloop broker` as a subprocess; `restart()` keeps its port."""

    def __init__(self, redis_url: str, workdir: Path, *extra: str, auth: bool = True,
                 tls_ca_file: str | None = None) -> None:
        self.port = free_port()
        self.redis_url, self.workdir, self.extra, self.auth = redis_url, workdir, extra, auth
        self.tls_ca_file = tls_ca_file
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "LORALOOP_TOKENS": TOKENS_ENV}
        args = [sys.executable, "-m", "services.cli", "broker", "--port", str(self.port),
                "--redis-url", self.redis_url, "--server.grace_s=1", *self.extra]
        if not self.auth:
            args.append("--auth.enabled=false")
        self.log = open(self.workdir / f"broker-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=Path(__file__).resolve().parents[2])
        from services.broker.client import BrokerClient

        target = self.target if not self.tls_ca_file else f"localhost:{self.port}"
        with BrokerClient(target, TOKENS["learner"], tls_ca_file=self.tls_ca_file) as c:
            try:
                c.wait_ready(30)
            except TimeoutError:
                self.stop()
                raise RuntimeError(f"broker did not start: {(self.workdir / f'broker-{self.port}.log').read_text()}") from None

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()

    def kill(self) -> None:
        stop_process(self.proc, signal.SIGKILL)
        self.log.close()

    def restart(self) -> None:
        self.stop()
        self.start()


class RolloutProc:
    """`loraloop rollout` as a subprocess (one vLLM engine); ready when its health check passes."""

    def __init__(self, model_dir: Path, broker_target: str, workdir: Path, *extra: str,
                 start_timeout_s: float = 240.0) -> None:
        self.port, self.http_port = free_port(), free_port()
        self.workdir = workdir
        env = {**os.environ, "LORALOOP_TOKENS": TOKENS_ENV, "LORALOOP_TOKEN": TOKENS["rollout"],
               "VLLM_CPU_KVCACHE_SPACE": "1"}
        args = [sys.executable, "-m", "services.cli", "rollout", "--port", str(self.port),
                "--model", str(model_dir), f"--broker={broker_target}", "--server.grace_s=1",
                f"--http.port={self.http_port}", "--http.grace_s=1",
                f"--adapters.dir={workdir / 'adapter-cache'}", *extra]
        self.log_path = workdir / f"rollout-{self.port}.log"
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=Path(__file__).resolve().parents[2])
        def exited() -> str | None:
            return "exited" if self.proc.poll() is not None else None

        try:
            wait_healthy(self.target, start_timeout_s, exited)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise RuntimeError("rollout did not start:\n" + self.log_path.read_text()[-4000:]) from None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"

    def stop(self) -> None:
        stop_process(self.proc, timeout_s=30)
        self.log.close()


class LearnerProc:
    """`loraloop learner` as a subprocess; `port` is read from <run_dir>/learner.port."""

    def __init__(self, model_dir: Path, broker_target: str, run_dir: Path, *extra: str,
                 start_timeout_s: float = 120.0) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "learner.port").unlink(missing_ok=True)
        env = {**os.environ, "LORALOOP_TOKENS": TOKENS_ENV, "LORALOOP_TOKEN": TOKENS["learner"]}
        args = [sys.executable, "-m", "services.cli", "learner", f"--model.path={model_dir}",
                f"--broker={broker_target}", "--port=0", f"--run_dir={run_dir}", "--server.grace_s=1", *extra]
        self.log_path = run_dir / "learner.log"
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=Path(__file__).resolve().parents[2])
        deadline = time.monotonic() + start_timeout_s
        while not (run_dir / "learner.port").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("learner did not start:\n" + self.log_path.read_text()[-4000:])
            time.sleep(0.1)
        self.port = int((run_dir / "learner.port").read_text())

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self.log.close()
        return rc

    def kill(self) -> None:
        stop_process(self.proc, signal.SIGKILL)
        self.log.close()

    def stop(self) -> None:
        stop_process(self.proc, timeout_s=30)
        self.log.close()


def run_cli(args: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """`python -m services.cli ARGS` to its end, output captured, like subprocess.run; past
    `timeout` it gets SIGTERM first (`up`/`chaos` then stop every service they started; the
    SIGKILL subprocess.run sends would orphan them), then TimeoutExpired is raised."""
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:  # past the timeout (TimeoutExpired goes on up) or on any other error
        stop_process(proc, timeout_s=90)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
