"""GPU smoke of the learner (issue 18): its update and its publish, under FSDP2, on one GPU.

    python tests/gpu/smoke.py                  # one GPU; prints one line and exits 0 without one
    python tests/gpu/smoke.py --device cpu     # the same code on the CPU (gloo, float32, tiny shape)

Run plainly, the script starts itself under torchrun (`--nproc` ranks, 1 by default); it
can also be started under torchrun directly. Every rank then, for each variant (`plain`, and
`offload` = `model.cpu_offload`, FSDP2's CPUOffloadPolicy: parameters, gradients and AdamW
state in host memory):
  - builds the learner's `Policy` (peft LoRA r16 all-linear on the 0.5b shape, Qwen2.5-0.5B's
    layers with random weights, bfloat16 with bf16 mixed precision) and `Trainer` (GRPO with
    the GPU example's settings: k3 KL loss 0.001, clip 0.2/0.28, lr 3e-5);
  - runs `--steps` updates (`Trainer.step`) on a synthetic batch (64 rows x 256 tokens);
  - publishes as the learner does: `Policy.adapter_state_dict()` gathers the LoRA tensors
    alone (a collective), rank 0 writes them with `Policy.write_adapter` (a PEFT directory);
    the file is then read back and must hold exactly the model's lora_A/lora_B tensors, in
    full shape.
Rank 0 prints a table: load, step (median after the first) and publish times, and GPU memory
(torch.cuda.max_memory_allocated, max over ranks). Any failed check exits non-zero.

Imports: torch, peft, transformers, safetensors (and tokenizers, which transformers brings)
and the project's light modules; no vLLM, Redis, gRPC or pydantic (the GPU image has none of
them). The learner's pydantic settings are therefore given as `Settings` objects with the same
field names (tests/unit/test_gpu_smoke.py validates them against the real sections).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a file (python tests/gpu/smoke.py, torchrun tests/gpu/smoke.py)
    sys.path.insert(0, str(ROOT))

SKIP = "gpu smoke skipped:"
"""The one line printed without a GPU starts with this."""
FORBIDDEN = ("vllm", "redis", "grpc", "pydantic")
"""Packages the smoke must not import (none is on the GPU image; see the module docstring)."""
ARGV_ENV = "LORALOOP_GPU_SMOKE_ARGV"
"""The launcher hands its arguments to the ranks in this variable (JSON list)."""
VARIANTS = {"plain": False, "offload": True}
"""Variant name -> model.cpu_offload."""

# Per device: model shape, dtype, bf16 mixed precision, batch (groups x samples, prompt +
# response tokens), micro-batch, steps per variant, torch threads.
DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": dict(shape="0.5b", dtype="bfloat16", mixed_precision=True, groups=8, samples=8, prompt=64,
                 response=192, micro_batch=16, steps=4, threads=8),
    "cpu": dict(shape="tiny", dtype="float32", mixed_precision=False, groups=2, samples=4, prompt=8,
                response=8, micro_batch=4, steps=2, threads=1),
}

# The algorithm settings, every field of services.learner.config.AlgoConfig that Trainer reads:
# GRPO as in examples/gsm8k-qwen2.5-gpu.toml (KL loss k3 0.001, clip-higher 0.28, lr 3e-5),
# the rest at AlgoConfig's defaults. micro_batch_size is set per run.
ALGO: dict[str, Any] = dict(
    advantage="grpo", loss_agg="token-mean", clip_low=0.2, clip_high=0.28, dual_clip_c=None, tis_cap=2.0,
    kl_coef=0.001, log_kl=True, log_kl_every=1, kl_type="k3", kl_in_reward=False, kl_ctrl="fixed",
    kl_target=None, kl_horizon=10000, entropy_coef=0.0, gamma=1.0, lam=1.0, critic_lr=None, value_clip=0.2,
    ppo_epochs=1, mini_batches=1, micro_batch_size=16, lr=3e-5, weight_decay=0.0, warmup_steps=0,
    grad_clip=1.0, max_staleness=1,
)


def model_settings(path: str, dtype: str, offload: bool, mixed_precision: bool, rank: int = 16) -> dict[str, Any]:
    """Every field of services.learner.config.ModelConfig (what Policy reads)."""
    return dict(path=path, dtype=dtype, lora_rank=rank, lora_alpha=2.0 * rank, target_modules="all-linear",
                exclude_modules=[], lora_dropout=0.0, init_adapter="", gradient_checkpointing=False,
                cpu_offload=offload, mixed_precision=mixed_precision)


class Settings:
    """A learner settings section without pydantic: its fields as attributes, `model_dump()`,
    and AlgoConfig's `needs_critic` (all that Policy and Trainer read of them)."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def model_dump(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def needs_critic(self) -> bool:
        from services.learner.algorithms import advantage_needs_values

        return advantage_needs_values(self.advantage)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tests/gpu/smoke.py",
        description="The learner's update and LoRA publish under FSDP2, with and without CPU offload, on one GPU "
                    "(nccl): step time and peak GPU memory per variant. Without a GPU it prints one line and "
                    "exits 0. --device cpu runs the same code on the CPU (gloo, float32, tiny shape).")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--nproc", type=int, default=1, help="ranks (torchrun --nproc_per_node), one GPU each")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: plain, offload")
    p.add_argument("--shape", choices=["tiny", "25m", "0.5b"], help="model shape (cuda: 0.5b, cpu: tiny)")
    p.add_argument("--model", help="a local HF model directory instead of building the shape")
    p.add_argument("--steps", type=int, help="updates per variant (cuda: 4, cpu: 2)")
    p.add_argument("--groups", type=int, help="prompt groups in the batch (cuda: 8, cpu: 2)")
    p.add_argument("--samples", type=int, help="samples per group (cuda: 8, cpu: 4)")
    p.add_argument("--prompt", type=int, help="prompt tokens per row (cuda: 64, cpu: 8)")
    p.add_argument("--response", type=int, help="response tokens per row (cuda: 192, cpu: 8)")
    p.add_argument("--micro-batch", type=int, help="rows per forward/backward on a rank (cuda: 16, cpu: 4)")
    p.add_argument("--threads", type=int, help="torch threads per rank (cuda: 8, cpu: 1)")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "loraloop-gpu-smoke",
                   help="models are built (and kept) and adapters written here (default: %(default)s)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    for k, v in DEFAULTS[a.device].items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if not a.variants or set(a.variants) - set(VARIANTS):
        p.error(f"--variants: one or more of {', '.join(VARIANTS)}")
    if min(a.nproc, a.steps, a.groups, a.samples, a.prompt, a.response, a.micro_batch, a.threads) < 1:
        p.error("counts must be >= 1")
    return a


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the GPU smoke (None: it can)."""
    import torch

    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return f"torch {torch.__version__} has no CUDA"
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        return ("no CUDA device" + (f" (CUDA_VISIBLE_DEVICES={shown!r})" if shown is not None else "")
                + f", torch {torch.__version__}")
    return None


def import_learner() -> dict[str, Any]:
    """The project modules the smoke runs (kept light: tests/unit/test_gpu_smoke.py checks it)."""
    from services.bench.update import demo_batch
    from services.common.memory import release_freed_memory
    from services.common.tiny_model import make_tiny_model
    from services.learner.policy import Policy
    from services.learner.trainer import Trainer

    return dict(demo_batch=demo_batch, release_freed_memory=release_freed_memory,
                make_tiny_model=make_tiny_model, Policy=Policy, Trainer=Trainer)


# ------------------------------------------------------------------ launcher


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Start this script under torchrun with `args.nproc` ranks (after the GPU check)."""
    from services.common.net import free_port

    if args.device == "cuda":
        reason = no_gpu_reason()
        if reason:
            print(f"{SKIP} {reason}", flush=True)
            return 0
        import torch

        if torch.cuda.device_count() < args.nproc:
            print(f"gpu smoke: --nproc {args.nproc} needs as many GPUs, {torch.cuda.device_count()} visible",
                  file=sys.stderr)
            return 2
    # The arguments travel in the environment: torchrun's own parser would take some of them
    # (--nproc is a prefix of its --nproc_per_node).
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           f"--master_port={free_port()}", str(Path(__file__).resolve())]
    env = {**os.environ, ARGV_ENV: json.dumps(argv), "OMP_NUM_THREADS": str(args.threads)}
    return subprocess.run(cmd, env=env).returncode


# ------------------------------------------------------------------ one rank (under torchrun)


def init_distributed(cuda: bool) -> None:
    """The process group as `loraloop learner` makes it (services/learner/app.py,
    `_init_distributed`): nccl (gloo without a GPU) when torchrun starts more than one rank;
    with one rank FSDP2's `fully_shard` makes the default group itself (gloo for CPU tensors,
    nccl for CUDA ones)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")


def expected_lora_shapes(policy) -> dict[str, tuple[int, ...]]:
    """PEFT key -> full shape of every LoRA tensor of the policy's adapter (DTensor shapes are global)."""
    from torch import nn

    out = {}
    for name, mod in policy.model.named_modules():
        for part in ("lora_A", "lora_B"):
            layers = getattr(mod, part, None)
            if isinstance(layers, nn.ModuleDict) and "default" in layers:
                out[f"{name}.{part}.weight"] = tuple(layers["default"].weight.shape)
    return out


def check_adapter(path: Path, expected: dict[str, tuple[int, ...]]) -> list[str]:
    """Problems with the written adapter file: keys other than the LoRA tensors, missing ones,
    wrong shapes (a shard instead of the whole tensor), non-finite values."""
    import torch
    from safetensors import safe_open

    problems = []
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for k in sorted(keys - set(expected)):
            problems.append(f"unexpected tensor {k}")
        for k in sorted(set(expected) - keys):
            problems.append(f"missing tensor {k}")
        for k in sorted(keys & set(expected)):
            t = f.get_tensor(k)
            if tuple(t.shape) != expected[k]:
                problems.append(f"{k}: shape {tuple(t.shape)}, expected {expected[k]}")
            elif not bool(torch.isfinite(t).all()):
                problems.append(f"{k}: non-finite values")
    return problems


def run_variant(name: str, args: argparse.Namespace, mods: dict, model: str, batch, device) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def mb(n: int) -> float:
        return n / 1e6

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    t = time.perf_counter()
    mcfg = Settings(**model_settings(model, args.dtype, VARIANTS[name], args.mixed_precision))
    policy = mods["Policy"](mcfg, device)
    trainer = mods["Trainer"](policy, Settings(**{**ALGO, "micro_batch_size": args.micro_batch}),
                              temperature=1.0, max_len=args.response)
    sync()
    r: dict[str, Any] = {"variant": name, "offload": VARIANTS[name], "load_s": time.perf_counter() - t}
    # Where this rank's shards live (with offload: host memory).
    r["param_devices"] = sorted({(p.to_local() if hasattr(p, "to_local") else p).device.type
                                 for p in policy.root.parameters()})
    if cuda:
        r["gpu_resident_mb"] = mb(torch.cuda.memory_allocated(device))
        r["gpu_load_peak_mb"] = mb(torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
    r["step_s"], r["loss"] = [], []
    for _ in range(args.steps):
        sync()
        t = time.perf_counter()
        m = trainer.step(batch)
        sync()
        r["step_s"].append(time.perf_counter() - t)
        r["loss"].append(m["actor/loss"])
    if cuda:
        r["gpu_update_peak_mb"] = mb(torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
    # The publish, as the learner's (app.py `_publish_adapter`, then `Publisher` on rank 0).
    sync()
    t = time.perf_counter()
    sd = policy.adapter_state_dict()
    r["gather_s"] = time.perf_counter() - t
    if cuda:
        r["gpu_publish_peak_mb"] = mb(torch.cuda.max_memory_allocated(device))
        r["gpu_peak_mb"] = max(r["gpu_load_peak_mb"], r["gpu_update_peak_mb"], r["gpu_publish_peak_mb"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        t = time.perf_counter()
        out = policy.write_adapter(sd, args.out / "adapters" / name)
        r["write_s"] = time.perf_counter() - t
        path = out / "adapter_model.safetensors"
        expected = expected_lora_shapes(policy)
        r.update(adapter=str(path), adapter_tensors=len(sd), adapter_mb=mb(path.stat().st_size),
                 problems=check_adapter(path, expected) if expected else ["the policy has no LoRA tensors"])
    r["backend"] = _backend()
    del sd, trainer, policy
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
    return r


def _backend() -> str:
    """The process group's backends ("cpu:gloo,cuda:nccl" for the one FSDP2 makes itself)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return "none (one unsharded rank)"
    b = str(dist.get_backend())
    if b == "undefined" and hasattr(dist, "get_backend_config"):
        b = str(dist.get_backend_config())
    return b


def worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    cuda = args.device == "cuda"
    rank = int(os.environ.get("RANK", "0"))
    if cuda:
        reason = no_gpu_reason()
        if reason:  # started under torchrun directly on a machine without a GPU
            if rank == 0:
                print(f"{SKIP} {reason}", flush=True)
            return 0
    mods = import_learner()
    mods["release_freed_memory"]()  # as `loraloop learner` does by default
    init_distributed(cuda)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if cuda:  # one GPU per rank, as the learner
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    model = args.model
    if not model:
        d = args.out / f"model-{args.shape}-{args.dtype}"
        if rank == 0 and not (d / "loraloop_model.json").is_file():  # written last: a whole model
            t = time.perf_counter()
            mods["make_tiny_model"](d, seed=0, shape=args.shape, dtype=args.dtype)
            print(f"built the {args.shape} shape ({args.dtype}) in {time.perf_counter() - t:.1f} s: {d}", flush=True)
        model = str(d)
    if dist.is_initialized():
        dist.barrier()
    batch = mods["demo_batch"](groups=args.groups, samples=args.samples, prompt=args.prompt, response=args.response)
    results = [run_variant(v, args, mods, model, batch, device) for v in args.variants]
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    per_rank = [results]
    if dist.is_initialized() and world > 1:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, results)
    ok = True
    if rank == 0:
        summary = summarise(args, per_rank, model, device, world)
        print(report(summary), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(summary, indent=1) + "\n")
        ok = not any(v["problems"] for v in summary["variants"])
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if ok else 1


def summarise(args: argparse.Namespace, per_rank: list[list[dict]], model: str, device, world: int) -> dict:
    import torch

    variants = []
    for i, name in enumerate(args.variants):
        rows = [ranks[i] for ranks in per_rank]
        r0 = rows[0]
        slowest = [max(s) for s in zip(*(x["step_s"] for x in rows), strict=True)]  # each step: its slowest rank
        v = {"variant": name, "offload": VARIANTS[name], "backend": r0["backend"],
             "load_s": max(x["load_s"] for x in rows), "step_s": slowest,
             "loss": r0["loss"], "gather_s": max(x["gather_s"] for x in rows), "write_s": r0["write_s"],
             "adapter": r0["adapter"], "adapter_tensors": r0["adapter_tensors"], "adapter_mb": r0["adapter_mb"],
             "problems": list(r0["problems"])}
        v["first_step_s"] = v["step_s"][0]
        v["step_s_median"] = statistics.median(v["step_s"][1:] or v["step_s"])
        if not all(map(_finite, v["loss"])):
            v["problems"].append(f"non-finite loss: {v['loss']}")
        v["param_devices"] = sorted({d for x in rows for d in x["param_devices"]})
        if device.type == "cuda" and v["param_devices"] != (["cpu"] if v["offload"] else ["cuda"]):
            v["problems"].append(f"parameters on {v['param_devices']} with offload={v['offload']}")
        for k in ("gpu_resident_mb", "gpu_load_peak_mb", "gpu_update_peak_mb", "gpu_publish_peak_mb", "gpu_peak_mb"):
            if k in r0:
                v[k] = max(x[k] for x in rows)
        variants.append(v)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {"smoke": "gpu", "device": dev, "device_type": device.type, "world": world, "shape": args.shape,
            "model": model, "dtype": args.dtype, "mixed_precision": args.mixed_precision, "lora": "r16 all-linear",
            "batch": {"rows": args.groups * args.samples, "tokens": args.prompt + args.response,
                      "micro_batch": args.micro_batch}, "steps": args.steps, "threads": args.threads,
            "torch": torch.__version__, "imported": sorted(m for m in FORBIDDEN if m in sys.modules),
            "variants": variants}


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def report(s: dict) -> str:
    b = s["batch"]
    # With one rank the group is FSDP2's own, made by the first variant that shards.
    backend = " / ".join(dict.fromkeys(v["backend"] for v in s["variants"]))
    lines = [
        f"loraloop GPU smoke: learner update + LoRA publish on {s['device']}, FSDP2 over {s['world']} rank(s) "
        f"(process group: {backend})",
        f"{s['shape']} shape ({s['dtype']}{', bf16 mixed precision' if s['mixed_precision'] else ''}), LoRA "
        f"{s['lora']}; batch {b['rows']} rows x {b['tokens']} tokens, micro-batch {b['micro_batch']}; "
        f"{s['steps']} steps per variant; torch {s['torch']}",
        f"{'variant':<8} {'offload':<7} {'load s':>7} {'step s':>7} {'1st s':>7} {'gather s':>8} {'write s':>7} "
        f"{'adapter MB':>10} {'GPU MB':>8} {'peak MB':>8} {'update pk':>9} {'check':<5}",
    ]

    def gpu(v: dict, k: str, w: int) -> str:
        return f"{v[k]:>{w}.0f}" if k in v else f"{'-':>{w}}"

    for v in s["variants"]:
        lines.append(
            f"{v['variant']:<8} {'yes' if v['offload'] else 'no':<7} {v['load_s']:>7.2f} {v['step_s_median']:>7.3f} "
            f"{v['first_step_s']:>7.3f} {v['gather_s']:>8.3f} {v['write_s']:>7.3f} {v['adapter_mb']:>10.1f} "
            f"{gpu(v, 'gpu_resident_mb', 8)} {gpu(v, 'gpu_peak_mb', 8)} {gpu(v, 'gpu_update_peak_mb', 9)} "
            f"{'ok' if not v['problems'] else 'FAIL':<5}")
    lines.append("step s: median wall time of an update after the first (1st s); gather: Policy.adapter_state_dict "
                 "(LoRA tensors only); write: rank 0's safetensors file.")
    lines.append("GPU MB: allocated once loaded; peak MB: torch.cuda.max_memory_allocated over loading, updates "
                 "and publish; update pk: over the updates alone (max over ranks).")
    for v in s["variants"]:
        lines.append(f"{v['variant']}: {v['adapter_tensors']} LoRA tensors -> {v['adapter']}")
        lines.extend(f"  FAIL: {p}" for p in v["problems"])
    if s["imported"]:
        lines.append(f"note: imported {', '.join(s['imported'])} (the GPU image has none of them)")
    return "\n".join(ln.rstrip() for ln in lines)


def main(argv: list[str]) -> int:
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:  # a rank under torchrun
        return worker(parse_args(json.loads(os.environ[ARGV_ENV]) if ARGV_ENV in os.environ else argv))
    return launch(parse_args(argv), argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
