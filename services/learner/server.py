"""`loraloop learner`: parses its config; with nproc > 1 it re-runs itself under torchrun."""

from __future__ import annotations

import logging
import os
import sys

from services.common.config import config_cli
from services.common.net import free_port
from services.learner.config import ALIASES, LearnerConfig


def main(argv: list[str]) -> int:
    cfg = config_cli(LearnerConfig, argv, "loraloop learner",
                     "Learner: trains the LoRA adapter with GRPO/PPO (peft under FSDP2), leases prompts to\n"
                     "rollout servers, takes their trajectories over gRPC, publishes every new adapter\n"
                     "version to the broker. With --nproc N it runs N ranks under torchrun.", ALIASES)
    if cfg.nproc > 1 and "LOCAL_RANK" not in os.environ:
        args = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.nproc}",
                f"--master_port={free_port()}", "-m", "services.cli", "learner", *argv]
        os.execv(sys.executable, args)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=cfg.log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s learner[{rank}] %(name)s: %(message)s")
    from services.learner.run import run

    run(cfg)
    return 0
