"""`loraloop learner`: parses its config (before torch is imported); with nproc > 1 it re-runs
itself under torchrun; then runs services.learner.app until done or SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

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
    from services.learner.app import run

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()  # the step under way ends, then the process (a second signal: at once)
        signal.signal(signum, signal.SIG_DFL)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    run(cfg, stop)
    return 0
