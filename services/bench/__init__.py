"""`loraloop bench`: benchmarks that print their figures and write them as JSON.

Each benchmark is a module with `main(argv) -> int` that parses its arguments before it
imports anything heavy, so `loraloop bench NAME --help` answers at once.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import sys
from pathlib import Path

# name -> (module with main(argv) -> int, one-line summary)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "broker": ("services.bench.broker",
               "publish/fetch MB/s against a raw Redis SET/GET floor, and watch notification latency"),
    "rollout": ("services.bench.rollout",
                "vLLM tok/s base vs one vs 8 mixed LoRA adapters, and publish->served hot-load latency"),
    "serving": ("services.bench.serving",
                "OpenAI-API tok/s and TTFT at 0/1/8/32 adapters, ours vs `vllm serve`; 1,000 Zipf adapters"),
    "traffic": ("services.bench.traffic",
                "streaming OpenAI clients on a training stack: versions served, failures, TTFT, step time with/without"),
    "peers": ("services.bench.peers",
              "loraloop up vs TRL GRPOTrainer (own venv) on the tiny demo: s/step, time to a reward target, memory"),
    "learner": ("services.bench.learner",
                "RL update tok/s and peak memory: LoRA (ref = adapter off) vs full fine-tuning + a reference copy"),
    "update": ("services.bench.update",
               "the learner's update on the demo batch (Policy + Trainer) vs a plain peft + torch loop, same threads"),
    "publish": ("services.bench.publish",
                "learner memory at publish: LoRA-only gather vs the full state dict, 1 vs N ranks, CPU offload"),
    "load": ("services.bench.load",
             "512 gRPC + 256 OpenAI streams on one replica, 10,000 publishes: errors, p99, RSS, fds/threads, Redis"),
    "all": ("services.bench.all",
            "every benchmark above (but traffic), one at a time, and docs/benchmarks.md with their tables and plots"),
    "rank": ("services.bench.rank",
             "LoRA ranks 1/8/32 vs full fine-tuning, lr sweep x seeds, one harness: docs/lora-rank.md (~30 min)"),
}


def emit(report: str, result: dict, out: Path | None) -> None:
    """Print a benchmark's table and, with --out, write every figure as JSON."""
    print(report)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {out}")


def percentile(xs: list[float], q: int) -> float:
    """The q-th percentile (inclusive method); a single sample is its own percentile."""
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def read_lines(path: str) -> list[str]:
    """A text file's lines, or none where it cannot be read (e.g. /proc on another OS)."""
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def listdir(path: str) -> list[str]:
    """A directory's entries, or none where it cannot be read (a process gone, /proc elsewhere)."""
    try:
        return os.listdir(path)
    except OSError:
        return []


def children(pid: int) -> list[int]:
    """`pid`'s child processes, started from any of its threads (/proc/PID/task/*/children)."""
    return [int(c) for task in listdir(f"/proc/{pid}/task")
            for line in read_lines(f"/proc/{pid}/task/{task}/children") for c in line.split()]


def tree_pids(root: int) -> list[int]:
    """`root` and every descendant."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.append(pid)
        todo += children(pid)
    return out


def wait_http_ok(url: str, timeout_s: float, exited=lambda: None) -> bool:
    """Poll `url` until it answers 200 (True), `exited()` returns a reason (False), or
    `timeout_s` passes (False)."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if exited() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def usage() -> str:
    width = max(map(len, BENCHMARKS))
    rows = "\n".join(f"  {n:<{width}}  {s}" for n, (_, s) in BENCHMARKS.items())
    return (
        "usage: loraloop bench BENCHMARK [ARGS...]\n\n"
        "Benchmarks that start the processes they need, print a table and write JSON.\n\n"
        f"benchmarks:\n{rows}\n\n"
        "`loraloop bench BENCHMARK --help` explains each one."
    )


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"loraloop bench: unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHMARKS[name][0]).main(rest) or 0)
