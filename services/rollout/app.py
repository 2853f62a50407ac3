"""The rollout process: one vLLM engine with the base model, the adapter manager and its
follower, the Rollout gRPC service, the OpenAI HTTP front, and (with `learner`/`learners`
set) a training worker per learner; served until SIGTERM/SIGINT or `stop`, then drained.
Whatever happens, the engine's processes and scratch files go with it."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import socket
from pathlib import Path

from loraloop.v1 import rollout_pb2_grpc as pb_grpc
from services.broker.client import BrokerClient
from services.common.grpc_server import AccessPolicy, Registration, serve
from services.rollout.adapters import AdapterManager, BaseModel, default_cache_dir
from services.rollout.config import RolloutConfig
from services.rollout.engine import Engine
from services.rollout.follower import Follower
from services.rollout.http_front import ROLES_OF_ROUTE, HttpServer, OpenAIFront
from services.rollout.metrics import RolloutMetrics
from services.rollout.requests import TokenCodec
from services.rollout.service import ROLES_OF_METHOD, SERVICE, RolloutServicer

log = logging.getLogger(__name__)


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere): the replica's start
    includes importing vLLM, which takes ~10 s before its engine starts."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


async def run(cfg: RolloutConfig, stop: asyncio.Event | None = None) -> None:
    token = os.environ.get(cfg.token_env)
    broker = BrokerClient(cfg.broker, token, tls=cfg.client_tls)
    engine = Engine(cfg.engine)
    manager: AdapterManager | None = None
    http: HttpServer | None = None
    follower = Follower(broker, asyncio.get_running_loop())
    try:
        await engine.start()
        age = process_age_s()
        if age is not None:
            log.info("engine ready %.1f s after the process started (vLLM engine %.1f s)", age, engine.start_s)
        base = BaseModel.from_dir(cfg.engine.model, cfg.engine.max_lora_rank)
        cache = Path(cfg.adapters.dir) if cfg.adapters.dir else default_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        metrics = RolloutMetrics()
        manager = AdapterManager(engine, broker, base, cache, watcher=follower,
                                 capacity=cfg.engine.max_cpu_loras, observer=metrics)
        follower.start(manager.on_published, manager.on_staged if cfg.adapters.load_staged else None)
        for name in cfg.adapters.follow:
            await manager.follow(name)
        codec = TokenCodec(cfg.engine.model)
        worker_task = None
        metrics.priority.labels("http").set(cfg.priority.users)
        metrics.priority.labels("grpc").set(cfg.priority.users)
        if cfg.learner_targets():
            from services.rollout.worker import run_workers

            worker_task = asyncio.create_task(run_workers(
                cfg, engine, manager, codec, token, cfg.worker_id or f"{socket.gethostname()}-{os.getpid()}", metrics))

        if cfg.http.enabled:
            http = await start_http(cfg, engine, manager, broker, metrics)

        def started(port: int) -> None:
            print(f"loraloop rollout listening on {cfg.server.host}:{port} (base {base.fingerprint[:19]}…)", flush=True)
            if http is not None:
                scheme = "https" if cfg.tls.enabled else "http"
                print(f"OpenAI API on {scheme}://{cfg.http.host}:{http.port}/v1 (model {http.front.h.base_id!r} "
                      "or an adapter: NAME, NAME@latest, NAME@vN)", flush=True)

        async def stopping() -> None:
            if http is not None:
                await http.stop()
            if worker_task:
                worker_task.cancel()
            follower.stop()

        await serve([Registration(pb_grpc.add_RolloutServicer_to_server,
                                  RolloutServicer(engine, manager, codec, cfg, metrics), SERVICE)],
                    cfg.server, cfg.auth, cfg.tls, ROLES_OF_METHOD, on_started=started, on_stopping=stopping,
                    stop_event=stop)
    finally:
        if http is not None:
            await http.stop()
        follower.stop()
        engine.shutdown()  # also when the start failed: its children and sockets go too
        if manager is not None:
            manager.close()
        broker.close()
        reap_children()


async def start_http(cfg: RolloutConfig, engine: Engine, manager: AdapterManager, broker: BrokerClient,
                     metrics: RolloutMetrics) -> HttpServer:
    """The OpenAI-compatible front on cfg.http, sharing the gRPC server's tokens and TLS."""
    from services.rollout.openai_serving import build_handlers

    handlers = await build_handlers(engine, manager, cfg.http.served_model_name or cfg.engine.model)
    token_roles = cfg.auth.token_roles() if cfg.auth.enabled else {}
    policy = AccessPolicy(ROLES_OF_ROUTE, token_roles, cfg.auth.enabled)
    front = OpenAIFront(handlers, manager, broker, metrics, policy, cfg.http.max_concurrent,
                        min_priority=cfg.priority.users)
    server = HttpServer(front, cfg.http, cfg.tls)
    await server.start()
    return server


def reap_children(timeout_s: float = 10.0) -> None:
    """vLLM's engine runs in child processes; do not exit before they have (a stopped
    server leaves nothing behind)."""
    for child in multiprocessing.active_children():
        child.join(timeout_s)
        if child.is_alive():
            log.warning("engine process %d did not exit; killing it", child.pid)
            child.kill()
            child.join(5)
