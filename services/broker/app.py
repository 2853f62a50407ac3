"""The broker process: the adapter registry over Redis, served over gRPC until SIGTERM/SIGINT
or `stop` (then running RPCs drain)."""

from __future__ import annotations

import asyncio
import logging
import os

from loraloop.v1 import adapters_pb2_grpc as pb_grpc
from services.broker.config import BrokerConfig
from services.broker.registry import AdapterRegistry
from services.broker.service import ROLES_OF_METHOD, SERVICE, AdapterRegistryServicer
from services.common.grpc_server import Registration, serve

log = logging.getLogger(__name__)


async def run(cfg: BrokerConfig, stop: asyncio.Event | None = None) -> None:
    registry = AdapterRegistry.from_config(cfg.redis, cfg.registry, os.environ.get(cfg.redis.password_env))
    registry.max_chunk_bytes = min(registry.max_chunk_bytes, max(512, cfg.server.max_message_bytes - 64))
    log.info(await registry.check_durability())

    def started(port: int) -> None:
        print(f"loraloop broker listening on {cfg.server.host}:{port}", flush=True)

    try:
        await serve([Registration(pb_grpc.add_AdapterRegistryServicer_to_server,
                                  AdapterRegistryServicer(registry), SERVICE)],
                    cfg.server, cfg.auth, cfg.tls, ROLES_OF_METHOD, on_started=started, stop_event=stop)
    finally:
        await registry.close()
