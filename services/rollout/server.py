"""`loraloop rollout`: parses its config (before vLLM is imported), then runs services.rollout.app
until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import sys

from services.common.config import config_cli
from services.rollout.config import ALIASES, RolloutConfig


def main(argv: list[str]) -> int:
    cfg = config_cli(RolloutConfig, argv, "loraloop rollout",
                     "Rollout server: one vLLM engine, the base model loaded once, LoRA adapters hot-loaded\n"
                     "from the broker (many at once). Serves Generate to clients and, with --learner, runs\n"
                     "the training loop: lease prompts, sample, score, stream trajectories back.", ALIASES)
    logging.basicConfig(level=cfg.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s rollout %(name)s: %(message)s")
    from services.rollout.app import run

    asyncio.run(run(cfg))
    return 0
