"""`loraloop`: one CLI, a sub-command per service and tool.

Sub-commands are imported only when chosen, and parse their config before importing
anything heavy, so `loraloop --help` and `loraloop SUB --help` answer at once.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv) -> int, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "broker": ("services.broker.server", "run the adapter registry (gRPC, backed by Redis)"),
    "rollout": ("services.rollout.server", "run a rollout server: vLLM + hot-loaded LoRA adapters"),
    "adapters": ("services.broker.cli", "list, show, pull, push, pin, unpin adapter versions"),
    "make-tiny-model": ("services.common.tiny_model", "build a small Qwen2 model + tokenizer (HF layout) from a seed"),
    "learner": ("services.learner.server", "run the learner: GRPO/PPO with LoRA under FSDP2, publishes adapters"),
    "export": ("services.learner.export", "write an adapter as a PEFT dir, or merged into its base (--merge)"),
    "up": ("services.stack", "run the whole loop locally: Redis, broker, learner, rollout replicas"),
    "chaos": ("services.chaos", "run the local stack while SIGKILLing each service in turn, and check nothing was lost"),
    "plot": ("services.plot", "draw a run's reward, KL, entropy and response-length curves to a PNG"),
    "bench": ("services.bench", "benchmarks that print their figures (broker, rollout, learner, serving, traffic, peers, all)"),
    "proto": ("services.common.protogen", "regenerate (gen) or verify (check) the code generated from proto/"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {n:<{width}}  {s}" for n, (_, s) in COMMANDS.items())
    return (
        "usage: loraloop COMMAND [ARGS...]\n\n"
        "RL fine-tuning with LoRA as decoupled gRPC services.\n\n"
        f"commands:\n{rows}\n\n"
        "`loraloop COMMAND --help` explains each one."
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"loraloop: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
