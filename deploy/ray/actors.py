"""Ray actors around the code the `loraloop` commands run: redis-server, the broker and
rollout servers (their `services.<kind>.app.run(cfg, stop)` on a thread with its own event
loop), and one learner rank per actor (`services.learner.app.run(cfg, stop)`). Ray only
places and supervises them, and stops them as the CLI's SIGTERM does: by setting the stop
event (the service drains). The services know nothing of Ray. torch and vLLM are imported
inside the actors, on their node.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import logging
import os
import signal
import subprocess
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from services.common import redis_server
from services.common.net import free_port, wait_healthy
from services.common.proc import stop_process

log = logging.getLogger(__name__)

# kind -> (config class, run coroutine): what `loraloop broker|rollout` runs.
SERVICES = {
    "broker": ("services.broker.config:BrokerConfig", "services.broker.app:run"),
    "rollout": ("services.rollout.config:RolloutConfig", "services.rollout.app:run"),
}


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def node_address(host: str | None) -> str:
    """`host` if given (127.0.0.1 on a local Ray), else this node's address on the cluster."""
    return host or ray.util.get_node_ip_address()


def process_tree(root: int | None = None) -> list[int]:
    """`root` (default: this process) and its descendants, read from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [root or os.getpid()]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def wait_serving(target: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Block until `target` answers grpc.health.v1 with SERVING; RuntimeError once `alive()` is false."""
    wait_healthy(target, timeout_s, still_alive=lambda: None if alive() else f"{target} exited before serving")


def _configure_logging(level: str, role: str) -> None:
    logging.basicConfig(level=level, force=True,
                        format=f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s")


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if this actor dies without stopping it (prctl
    PR_SET_PDEATHSIG; tied to the forking thread, so call it from the actor's main thread)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


@ray.remote
class RedisServer:
    """redis-server as this actor's child: AOF with appendfsync always (the broker refuses
    anything less), password-protected (in a 0600 file, never on the command line)."""

    def __init__(self, data_dir: str, host: str | None, password: str) -> None:
        redis_server.require()
        self.host = node_address(host)
        self.port = free_port(self.host)
        args = redis_server.command(self.port, data_dir, host=self.host, password=password,
                                    logfile=Path(data_dir) / "redis.log")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)
        try:
            redis_server.wait_ready(self.port, host=self.host, password=password,
                                    exited=lambda: self.proc.poll() is not None)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}; see {data_dir}/redis.log") from None

    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def pids(self) -> list[int]:
        return process_tree()

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_process(self.proc, timeout_s=timeout_s)


@ray.remote(max_concurrency=4)
class ServiceActor:
    """One gRPC service (`broker` or `rollout`) on its own thread and event loop in this actor.

    `stop()` sets the stop event `run(cfg, stop)` serves until: running RPCs drain, then its
    `finally` blocks run (the rollout shuts its vLLM engine process down, the broker closes
    Redis)."""

    def __init__(self, kind: str) -> None:
        if kind not in SERVICES:
            raise ValueError(f"unknown service {kind!r}; one of {sorted(SERVICES)}")
        self.kind = kind
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._error: str | None = None
        self._stopping = False

    def start(self, cfg: dict[str, Any], host: str | None, timeout_s: float) -> str:
        """Serve on a free port of this node; returns host:port once its health check passes."""
        config_cls, run = (_load(ref) for ref in SERVICES[self.kind])
        host = node_address(host)
        port = free_port(host)
        cfg = {**cfg, "server": {**cfg.get("server", {}), "host": host, "port": port}}
        if "http" in config_cls.model_fields:  # a rollout's OpenAI front: a free port of this node too
            cfg["http"] = {**cfg.get("http", {}), "host": host, "port": free_port(host)}
        config = config_cls.model_validate(cfg)
        _configure_logging(config.log_level, self.kind)
        self._thread = threading.Thread(target=self._serve, args=(run, config), name=f"loraloop-{self.kind}",
                                        daemon=True)
        self._thread.start()
        target = f"{host}:{port}"
        try:
            wait_serving(target, timeout_s, alive=self._thread.is_alive)
        except (RuntimeError, TimeoutError) as e:
            if self._stopping:
                return ""  # stopped while starting: nothing to report
            raise RuntimeError(f"{self.kind} did not start: {e}\n{self._error or ''}") from None
        return target

    def _serve(self, run: Callable[[Any, asyncio.Event], Any], config: Any) -> None:
        async def main() -> None:
            self._stop_event = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            if not self._stopping:
                await run(config, self._stop_event)

        try:
            asyncio.run(main())
        except BaseException as e:  # SystemExit included: reported by join()/start()
            self._error = "".join(traceback.format_exception(e))
            log.error("%s failed:\n%s", self.kind, self._error)

    def join(self) -> None:
        """Block until the service ends; raises if it failed."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"{self.kind} failed:\n{self._error}")

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping = True
        if self._loop is not None and self._stop_event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed: the service had ended
                self._loop.call_soon_threadsafe(self._stop_event.set)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def pids(self) -> list[int]:
        return process_tree()


@ray.remote(max_concurrency=2)
class LearnerRank:
    """One learner rank: `services.learner.app.run(cfg, stop)` with its torch.distributed env
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; gloo on CPU, nccl on GPUs)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self._done = False
        self._stop = threading.Event()

    def placement(self) -> dict[str, Any]:
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def free_port(self, host: str) -> int:
        return free_port(host)

    def run(self, cfg: dict[str, Any], env: dict[str, str]) -> None:
        """Train to the configured step count; returns when done (raises if the rank failed)."""
        os.environ.update(env)
        from services.learner.config import LearnerConfig

        config = LearnerConfig.model_validate(cfg)
        _configure_logging(config.log_level, f"learner[{self.rank}]")
        from services.learner.app import run

        try:
            run(config, self._stop)
        except SystemExit as e:  # a SystemExit would end the actor instead of reporting the error
            raise RuntimeError(f"learner rank {self.rank}: {e}") from None
        finally:
            self._done = True

    def stop(self) -> None:
        """End after the step under way (rank 0 decides for every rank; `run` then returns)."""
        self._stop.set()

    def wait_serving(self, target: str, timeout_s: float) -> bool:
        """True once rank 0 serves leases; False if the run ended first (nothing left to train)."""
        try:
            wait_serving(target, timeout_s, alive=lambda: not self._done)
        except RuntimeError:
            if self._done:
                return False
            raise
        return True

    def pids(self) -> list[int]:
        return process_tree()
