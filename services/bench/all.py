"""`loraloop bench all`: every benchmark, one after the other, and the page that shows them.

Each benchmark runs as `loraloop bench NAME ... --out DIR/NAME.json` in a process of its own
(never two at once: they would share the cores), its printed tables are kept in DIR/NAME.txt,
and `--page` (default docs/benchmarks.md) gets one section per benchmark: the tables it
printed (ours, the peer or floor measured in the same run, the ratio, the goal), the
figures' PNGs, and a header naming the machine, the versions and the commit that produced
them. A benchmark that fails is reported on the page with its exit code and output tail;
the others still run. `bench traffic` needs a running stack and is not part of it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Step:
    """One benchmark invocation of the page."""

    key: str  # the section and file name
    bench: str  # `loraloop bench NAME`
    title: str
    args: list[str] = field(default_factory=list)
    quick: list[str] = field(default_factory=lambda: ["--quick"])
    pngs: list[str] = field(default_factory=list)  # files the run writes into DIR


STEPS = [
    Step("peers-tiny", "peers", "loraloop vs TRL: the tiny demo (s/step, time to target, memory; async vs sync)",
         ["--staleness", "0,1,2", "--staleness-steps", "300", "--plot", "{dir}/reward-vs-time-tiny.png",
          "--work-dir", "{dir}/work-peers"],
         ["--quick", "--plot", "{dir}/reward-vs-time-tiny.png", "--work-dir", "{dir}/work-peers"],
         pngs=["reward-vs-time-tiny.png"]),
    Step("peers-heavy", "peers", "loraloop vs TRL: generation-heavy (25m, 16x8 samples x 128 tokens)",
         ["--workload", "heavy", "--steps", "30", "--target-gain", "0.1", "--plot", "{dir}/reward-vs-time-heavy.png",
          "--work-dir", "{dir}/work-peers"],
         ["--workload", "heavy", "--steps", "2", "--work-dir", "{dir}/work-peers"],
         pngs=["reward-vs-time-heavy.png"]),
    Step("learner", "learner", "the learner's update: LoRA (reference = adapter off) vs full fine-tuning"),
    Step("publish", "publish", "learner memory at publish (LoRA-only gather vs full state dict), 1 vs 2 ranks, CPU offload"),
    Step("update", "update", "the learner's update on the demo batch vs a plain peft + torch loop, same threads"),
    Step("rollout", "rollout", "rollout engine tok/s with 0/1/8 adapters, and publish-to-served hot-load latency"),
    Step("broker", "broker", "broker publish/fetch MB/s against raw Redis, watch latency"),
    Step("serving", "serving", "OpenAI API: ours vs `vllm serve`, 0/1/8/32 adapters, 1,000 Zipf adapters"),
    Step("load", "load", "load held: 512 gRPC + 256 OpenAI streams on one replica, 10,000 publishes with retention"),
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="loraloop bench all",
        description="Run every benchmark (one at a time) and write docs/benchmarks.md: each benchmark's tables "
                    "(ours, the peer or floor from the same run, ratio, goal) and plots, with the machine and "
                    "versions that produced them. The full set takes hours on 2 cores; --quick is a smoke run.")
    p.add_argument("--out", type=Path, required=True, help="directory for every benchmark's JSON, output and PNGs")
    p.add_argument("--page", type=Path, default=Path("docs/benchmarks.md"), help="the page to write")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(s.key for s in STEPS)}")
    p.add_argument("--quick", action="store_true", help="each benchmark's smoke run (the page says so)")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds allowed per benchmark")
    a = p.parse_args(argv)
    keys = [k for k in a.only.split(",") if k]
    unknown = set(keys) - {s.key for s in STEPS}
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; choose from {', '.join(s.key for s in STEPS)}")
    a.steps = [s for s in STEPS if not keys or s.key in keys]
    return a


def run_step(step: Step, out: Path, quick: bool, timeout_s: float) -> dict:
    """Run one benchmark; its stdout+stderr go to out/<key>.txt. Returns what the page needs."""
    args = [a.format(dir=out) for a in (step.quick if quick else step.args)]
    cmd = [sys.executable, "-m", "services.cli", "bench", step.bench, *args, "--out", str(out / f"{step.key}.json")]
    print(f"[{step.key}] {' '.join(cmd[2:])}", flush=True)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, f"{e.stdout or ''}\n(timed out after {timeout_s:.0f} s)"
        text = text if isinstance(text, str) else text.decode(errors="replace")
    (out / f"{step.key}.txt").write_text(text)
    secs = time.monotonic() - t0
    print(f"[{step.key}] exit {rc} after {secs:.0f} s", flush=True)
    return {"key": step.key, "rc": rc, "seconds": secs, "cmd": " ".join(cmd[2:]), "text": text}


def tables(text: str) -> str:
    """The report part of a benchmark's output: without progress bars (lines redrawn with
    carriage returns), log lines or the `wrote FILE` line; its last 60 lines."""
    keep = []
    for line in text.split("\n"):
        line = line.rstrip()
        if not line or "\r" in line or line.startswith(("wrote ", "[", "  trl-peer", "INFO", "WARNING", "(EngineCore", "(Worker")):
            continue
        keep.append(line)
    return "\n".join(keep[-60:])


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or "?")
    mem = next((line.split()[1] for line in _lines("/proc/meminfo") if line.startswith("MemTotal")), "0")
    flags = next((line for line in _lines("/proc/cpuinfo") if line.startswith("flags")), "")
    versions = {}
    for mod in ("torch", "vllm", "peft", "transformers", "grpc", "redis"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # not installed here: left out
            continue
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    return {"cpu": cpu, "cores": str(len(os.sched_getaffinity(0))), "memory_gib": f"{int(mem) / 2**20:.0f}",
            "avx512": "yes" if "avx512f" in flags else "no", "python": platform.python_version(),
            "versions": ", ".join(f"{k} {v}" for k, v in versions.items()), "commit": commit or "?"}


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def write_page(page: Path, out: Path, results: list[dict], quick: bool, m: dict[str, str]) -> Path:
    rel = os.path.relpath(out, page.parent)
    lines = ["# Benchmarks", "",
             f"Written by `loraloop bench all{' --quick' if quick else ''} --out {out}` on "
             f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC at commit {m['commit']}.", "",
             f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, AVX-512 {m['avx512']}",
             f"- Python {m['python']}; {m['versions']}", ""]
    if quick:
        lines += ["**Smoke run (`--quick`): a few steps each. These figures show the benchmarks run; they "
                  "are not the project's measurements.**", ""]
    for r in results:
        step = next(s for s in STEPS if s.key == r["key"])
        lines += [f"## {step.title}", "", f"`loraloop {r['cmd']}` ({r['seconds']:.0f} s, exit {r['rc']})", ""]
        if r["rc"] != 0:
            lines += ["**Failed.** Output tail:", "", "```", "\n".join(r["text"].splitlines()[-25:]), "```", ""]
            continue
        lines += ["```", tables(r["text"]), "```", ""]
        for png in step.pngs:
            if (out / png).is_file():
                lines += [f"![{png}]({rel}/{png})", ""]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines))
    return page


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    m = machine()
    results = [run_step(s, out, a.quick, a.timeout) for s in a.steps]
    (out / "all.json").write_text(json.dumps({"machine": m, "quick": a.quick,
                                              "results": [{k: v for k, v in r.items() if k != "text"}
                                                          for r in results]}, indent=1))
    page = write_page(a.page, out, results, a.quick, m)
    failed = [r["key"] for r in results if r["rc"] != 0]
    print(f"wrote {page}" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0
