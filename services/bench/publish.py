"""`loraloop bench publish`: what publishing costs the learner's memory, sharded or not, and
what FSDP2 CPU offload saves (issue 18: verl's `layered_summon` and `param_offload`).

Each setting runs in fresh processes (`torchrun --nproc_per_node N` for N ranks; gloo on this
machine), on the 0.5b shape by default (Qwen2.5-0.5B's layers, float32 weights 1.43 GB),
LoRA r=16 all-linear. In every rank it measures resident memory (VmRSS/VmHWM, MB):
  - after the model is loaded (and sharded for N > 1 or with offload);
  - the peak of one update on a small batch (4 prompts x 4 samples, 48 tokens; VmHWM reset
    before it);
  - the peak while the adapter is gathered for a publish (`Policy.adapter_state_dict`: the LoRA
    tensors only, each gathered whole), against the adapter's own size;
  - for comparison, the peak of gathering the full model state dict (every base weight too),
    which is what a publish that does not pick the LoRA tensors out pays.
The peaks are VmHWM after a reset to the current VmRSS (`/proc/self/clear_refs`), minus that
VmRSS: how much the step added. Settings: `--ranks 1,2` and `--offload` (adds the same ranks
with `model.cpu_offload`, FSDP2's CPUOffloadPolicy, which on a CPU machine keeps the sharded
parameters where they are and exercises the offload code path).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services.bench import emit


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="loraloop bench publish",
        description="The learner's memory when it publishes (LoRA tensors gathered alone vs the full state dict), "
                    "sharded over N ranks or not, with and without FSDP2 CPU offload; each setting in fresh "
                    "processes under torchrun.")
    p.add_argument("--out", type=Path, help="write every figure to this JSON file")
    p.add_argument("--shape", default="0.5b", choices=["tiny", "25m", "0.5b"], help="model shape")
    p.add_argument("--ranks", default="1,2", help="rank counts to run, comma-separated")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True,
                   help="also run every rank count with model.cpu_offload (FSDP2 CPUOffloadPolicy)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per setting")
    p.add_argument("--quick", action="store_true", help="tiny shape, ranks 1,2")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.shape, a.ranks = "tiny", "1,2"
    a.ranks = [int(x) for x in str(a.ranks).split(",") if x.strip()]
    if not a.ranks or min(a.ranks) < 1:
        p.error("--ranks: positive integers")
    return a


# ------------------------------------------------------------------ one rank (under torchrun)


def worker(spec: dict) -> None:
    import ctypes
    import gc

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    from services.bench.learner import proc_status, reset_peak
    from services.bench.update import demo_batch
    from services.learner.config import AlgoConfig, ModelConfig
    from services.learner.policy import Policy
    from services.learner.trainer import Trainer

    rank = dist.get_rank() if dist.is_initialized() else 0
    base = proc_status()["VmRSS"]
    t0 = time.perf_counter()
    policy = Policy(ModelConfig(path=spec["model"], lora_rank=16, lora_alpha=32, target_modules="all-linear",
                                cpu_offload=spec["offload"]))
    load_s = time.perf_counter() - t0
    loaded = proc_status()["VmRSS"]

    def peak_of(fn):
        if dist.is_initialized():
            dist.barrier()
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # what earlier steps freed goes back first
        reset_peak()
        before = proc_status()["VmRSS"]
        t = time.perf_counter()
        out = fn()
        s = time.perf_counter() - t
        return out, proc_status()["VmHWM"] - before, s

    trainer = Trainer(policy, AlgoConfig(lr=1e-4, micro_batch_size=16, log_kl=False))
    batch = demo_batch(groups=4, samples=4, prompt=16, response=32)
    _, update_peak, update_s = peak_of(lambda: trainer.step(batch))
    sd, lora_peak, lora_s = peak_of(policy.adapter_state_dict)
    adapter_mb = sum(v.numel() * v.element_size() for v in sd.values()) / 1e6
    del sd

    def full_state() -> int:
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                for k, v in policy.root.state_dict().items()}
        return sum(v.numel() * v.element_size() for v in full.values())

    full_bytes, full_peak, full_s = peak_of(full_state)
    result = {"rank": rank, "world": dist.get_world_size() if dist.is_initialized() else 1,
              "offload": spec["offload"], "load_s": load_s, "rss_mb": {"start": base, "loaded": loaded},
              "update_peak_mb": update_peak, "update_s": update_s,
              "adapter_mb": adapter_mb, "lora_gather_peak_mb": lora_peak, "lora_gather_s": lora_s,
              "full_state_mb": full_bytes / 1e6, "full_gather_peak_mb": full_peak, "full_gather_s": full_s}
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------ driver


def run_setting(model: Path, ranks: int, offload: bool, workdir: Path, timeout: float) -> dict:
    from services.common.net import free_port

    out = workdir / f"r{ranks}-{'offload' if offload else 'plain'}"
    out.mkdir(parents=True, exist_ok=True)
    spec = json.dumps({"model": str(model), "offload": offload, "out": str(out)})
    mod = ["-m", "services.bench.publish", "--worker", spec]
    if ranks == 1 and not offload:
        cmd = [sys.executable, *mod]
    else:  # FSDP2 needs a process group, even for one rank with offload
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               f"--master_port={free_port()}", *mod]
    from services.common import memory

    # As `loraloop learner` runs (learner.release_freed_memory): blocks over 4 MB are mapped
    # apart and go back to the kernel when freed. Otherwise a step reuses what the one before
    # it freed and its own rise reads as ~0.
    env = {**os.environ, **memory.ENV, "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        return {"ranks": ranks, "offload": offload, "error": (proc.stdout + proc.stderr)[-3000:]}
    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    return {"ranks": ranks, "offload": offload, "wall_s": time.perf_counter() - t, "per_rank": per_rank}


def run(args: argparse.Namespace, workdir: Path) -> dict:
    from services.common.tiny_model import make_tiny_model

    dtype = "float32"
    model = make_tiny_model(workdir / args.shape, seed=0, shape=args.shape, dtype=dtype)
    settings = [(r, False) for r in args.ranks] + ([(r, True) for r in args.ranks] if args.offload else [])
    results = []
    for ranks, offload in settings:
        print(f"publish bench: {ranks} rank(s){' with CPU offload' if offload else ''} ...", flush=True)
        results.append(run_setting(model, ranks, offload, workdir, args.timeout))
    return {"benchmark": "publish", "shape": args.shape, "dtype": dtype, "lora": "r16 all-linear",
            "settings": results}


def report(r: dict) -> str:
    lines = [f"loraloop bench publish: {r['shape']} shape ({r['dtype']}), LoRA {r['lora']}; MB per rank (max over ranks)",
             f"{'ranks':>5} {'offload':>7} | {'loaded':>7} {'update +':>8} | {'adapter':>7} {'LoRA gather +':>13} "
             f"{'full gather +':>13} {'full state':>10}"]
    for s in r["settings"]:
        if "error" in s:
            why = [ln for ln in s["error"].splitlines() if "Error:" in ln] or s["error"].strip().splitlines()[-1:]
            lines.append(f"{s['ranks']:>5} {s['offload']!s:>7} | failed: {why[-1].strip()[:140]}")
            continue
        pr = s["per_rank"]

        def mx(key: str, pr: list = pr) -> float:
            return max(x[key] for x in pr)

        lines.append(f"{s['ranks']:>5} {s['offload']!s:>7} | {max(x['rss_mb']['loaded'] for x in pr):>7.0f} "
                     f"{mx('update_peak_mb'):>8.0f} | {mx('adapter_mb'):>7.1f} {mx('lora_gather_peak_mb'):>13.1f} "
                     f"{mx('full_gather_peak_mb'):>13.0f} {mx('full_state_mb'):>10.0f}")
    lines.append("'+' = VmHWM during that step minus VmRSS before it. A publish gathers the LoRA tensors only: its "
                 "rise is about the adapter's size, not the model's.")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    with tempfile.TemporaryDirectory(prefix="loraloop-bench-publish-") as d:
        result = run(args, Path(d))
    emit(report(result), result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
