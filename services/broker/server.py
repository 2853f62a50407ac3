"""`loraloop broker`: parses its config, then runs services.broker.app until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import sys

from services.broker.config import ALIASES, BrokerConfig
from services.common.config import config_cli


def main(argv: list[str]) -> int:
    cfg = config_cli(BrokerConfig, argv, "loraloop broker",
                     "Adapter registry: versions every LoRA adapter the learner publishes, in Redis,\n"
                     "and streams new versions to rollout servers.", ALIASES)
    logging.basicConfig(level=cfg.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s broker %(name)s: %(message)s")
    from services.broker.app import run

    try:
        asyncio.run(run(cfg))
    except ConnectionError as e:
        print(f"loraloop broker: {e}", file=sys.stderr)
        return 1
    return 0
