"""`loraloop bench learner`: what LoRA saves the learner, against full fine-tuning.

Both setups do the same RL update on the same synthetic batch: GRPO advantages, the PPO
clipped loss with a k3 KL-to-reference term (kl_coef 0.01) and truncated importance
weights, one AdamW step per batch, micro-batches for gradient accumulation:
  (a) lora: the project's `Policy` + `Trainer` (peft r=16 all-linear); the reference is the
      base with the adapter disabled; AdamW over the LoRA parameters only.
  (b) full: plain transformers + torch; every parameter trains and the reference is a
      second, frozen copy of the base in memory; AdamW over all parameters. The loss is
      `algorithms.policy_loss` with the arguments `Trainer.step` passes it.
Each (model, setup) runs in its own fresh process so its peak memory is its own: VmHWM
from /proc/self/status, and its rise over the process's VmRSS once torch, transformers and
peft are imported. transformers maps fp32 safetensors into memory, so weights count (as
RssFile) once a forward touches them; parameters the optimizer writes become anonymous.
Loading is measured apart: VmHWM after the model(s) are built is `load_peak`; then VmHWM
is reset (`5` written to /proc/self/clear_refs) and VmHWM after the updates is
`train_peak`; `peak` = the larger of the two (the process's peak; loading maps the
weights without a copy, so training sets it). A sampler thread (every 0.1 s) also keeps
RssAnon/RssFile at the highest VmRSS it saw, to tell weights from the rest.
Throughput: sequence tokens in the batch / wall time of one update, median over --steps
updates after one untimed warm-up update.

Both setups always run with the same settings, printed and written to the JSON:
  --grad-ckpt   HF gradient checkpointing (non-reentrant) on the trained model: for lora
                `ModelConfig.gradient_checkpointing`, for full the same
                `gradient_checkpointing_enable` call on its model;
  --malloc      the glibc malloc environment of the measured processes. `release`
                (default) fixes the mmap threshold so big tensors get their own mapping
                and go back to the kernel when freed. glibc's default raises the threshold
                (up to 32 MB) after each such free, after which activation-sized blocks
                come from the heap arenas and stay resident when freed: on the 0.5b shape
                that alone added ~3 GB to LoRA's peak. `glibc` = no variables set;
  --micro-batch the gradient-accumulation micro-batch (default: the workload's).
The 0.5b shape has Qwen2.5-0.5B's layers but a 16-token vocabulary (the tiny
tokenizer), so its logits are negligible; weights are 1.43 GB in float32.

Goal: LoRA peak <= 0.6x full fine-tuning peak. Not checked on `tiny` (0.3 M parameters):
there the torch runtime is > 99% of either peak, so the ratio measures the runtime.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.bench import emit
from services.common import memory

if TYPE_CHECKING:
    from torch import Tensor, nn

    from services.learner.batch import Batch
    from services.learner.config import AlgoConfig

GOAL_PEAK_RATIO = 0.6
GOAL_EXEMPT = ("tiny",)
SETUPS = ("lora", "full")
RANK = 16
KL_COEF = 0.01
GROUP_SIZE = 4
LOW_MEM_MB = 1000  # MemAvailable below this during a run: warn that its peak may read low
# Full fine-tuning takes a far smaller step than LoRA in practice; the speed is the same.
FULL_LR = 1e-5
# glibc malloc environments for the measured processes (both setups get the same one).
# `release`: a fixed 4 MB mmap threshold (setting it turns glibc's dynamic threshold off):
# blocks from 4 MB up (an MLP activation of a micro-batch of 4 x 128 is 10 MB) are mapped
# on their own and unmapped when freed; smaller ones reuse the heap, so speed holds (a
# 128 KB threshold also released memory but made every update ~2x slower: page faults).
MALLOC_ENVS: dict[str, dict[str, str]] = {
    "release": dict(memory.ENV),  # what `loraloop learner` sets in-process (services.common.memory)
    "glibc": {},
}
_MALLOC_VARS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                "MALLOC_MMAP_MAX_", "LD_PRELOAD")


@dataclass(frozen=True)
class Workload:
    seqs: int
    tokens: int  # per sequence: prompt + response
    prompt: int
    micro_batch: int


# 0.5b: micro-batches of 4 (gradient accumulation), as a learner of that size would run on
# a CPU; one pass of 16 x 128 would add ~4 GB of activations to both setups alike.
WORKLOADS = {
    "tiny": Workload(seqs=64, tokens=8, prompt=5, micro_batch=64),
    "25m": Workload(seqs=32, tokens=64, prompt=16, micro_batch=32),
    "0.5b": Workload(seqs=16, tokens=128, prompt=32, micro_batch=4),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="loraloop bench learner",
        description="One RL update (GRPO, PPO-clip + KL to the reference, AdamW) with LoRA (reference = "
                    "adapter disabled) against full fine-tuning with a second copy of the base as reference: "
                    "update tokens/s and peak resident memory, each setup in its own fresh process.",
    )
    p.add_argument("--out", type=Path, help="write every figure to this JSON file")
    p.add_argument("--models", default="tiny,0.5b", help=f"model shapes ({', '.join(WORKLOADS)})")
    p.add_argument("--steps", type=int, default=3, help="timed updates per setup after one warm-up (median)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="base weights dtype")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch threads in each measured process (they run one at a time)")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=False,
                   help="gradient checkpointing on the trained model, in both setups")
    p.add_argument("--malloc", choices=list(MALLOC_ENVS), default="release",
                   help="glibc malloc environment of both measured processes: release = fixed 4 MB mmap "
                        "threshold, 2 arenas (freed activations go back to the kernel); glibc = its defaults")
    p.add_argument("--micro-batch", type=int, help="micro-batch size for every model, both setups "
                   f"(default per model: {', '.join(f'{k} {w.micro_batch}' for k, w in WORKLOADS.items())})")
    p.add_argument("--quick", action="store_true", help="tiny model only, 2 timed steps")
    a = p.parse_args(argv)
    if a.quick:
        a.models, a.steps = "tiny", 2
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in a.models if m not in WORKLOADS]
    if bad:
        p.error(f"unknown model shape(s) {bad}; choose from {', '.join(WORKLOADS)}")
    if a.steps < 1 or a.threads < 1 or (a.micro_batch is not None and a.micro_batch < 1):
        p.error("--steps, --threads and --micro-batch must be >= 1")
    return a


# ------------------------------------------------------------------ the measured process


def workload(shape: str, micro_batch: int | None) -> Workload:
    wl = WORKLOADS[shape]
    return wl if micro_batch is None else Workload(wl.seqs, wl.tokens, wl.prompt, min(micro_batch, wl.seqs))


def proc_status() -> dict[str, float]:
    """This process's resident memory, MB (1e6 bytes), from /proc/self/status."""
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) * 1024 / 1e6
            for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def reset_peak() -> bool:
    """Reset VmHWM to the current VmRSS (Linux >= 4.0); False where that is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class LowestMemAvailable:
    """Samples the machine's MemAvailable every 0.1 s. Under memory pressure the kernel drops
    clean file pages - here the mmapped weights - so a peak measured then reads low. Also
    keeps this process's RssAnon/RssFile at the highest VmRSS sampled (`at_peak`)."""

    def __init__(self) -> None:
        self.lowest_mb = self.now()
        self.at_peak = proc_status()
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def now() -> float:
        text = Path("/proc/meminfo").read_text()
        return int(re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M).group(1)) * 1024 / 1e6

    def _run(self) -> None:
        for i in itertools.count():
            if self._stop.wait(0.1):
                return
            s = proc_status()
            if s["VmRSS"] > self.at_peak["VmRSS"]:
                self.at_peak = s
            if i % 5 == 0:
                self.lowest_mb = min(self.lowest_mb, self.now())

    def stop(self) -> float:
        self._stop.set()
        return min(self.lowest_mb, self.now())


@dataclass
class _Sample:
    response_token_ids: list[int]
    logprobs: list[float]
    reward: float
    adapter_version: int = 1


@dataclass
class _Group:
    prompt_token_ids: list[int]
    samples: list[_Sample] = field(default_factory=list)


def synthetic_batch(wl: Workload, seed: int = 0, group_size: int = GROUP_SIZE) -> Batch:
    """Groups of `group_size` samples, random character tokens (ids 3..14 of the tiny models'
    vocabulary), behaviour log-probs in (-3, 0], 0/1 rewards that differ within every group."""
    import torch

    from services.learner.batch import collate

    g = torch.Generator().manual_seed(seed)
    resp = wl.tokens - wl.prompt
    groups = []
    for k in range(wl.seqs // group_size):
        prompt = [1, *torch.randint(3, 15, (wl.prompt - 1,), generator=g).tolist()]
        samples = [_Sample(torch.randint(3, 15, (resp,), generator=g).tolist(),
                           (-torch.rand(resp, generator=g) * 3).tolist(), float((j + k) % 3 == 0))
                   for j in range(group_size)]
        groups.append(_Group(prompt, samples))
    return collate(groups, pad_id=0)


def token_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                   with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """`Policy.token_logprobs` for a plain transformers model (temperature 1)."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    tok = torch.gather(logp, -1, input_ids[:, 1:, None]).squeeze(-1)
    pad = torch.zeros_like(tok[:, :1])
    ent = torch.cat([pad, -(logp.exp() * logp).sum(-1)], 1) if with_entropy else None
    return torch.cat([pad, tok], 1), ent


class FullFinetune:
    """Setup (b): every parameter trains; the reference is a second, frozen copy of the base.
    `step` is `Trainer.step` for one rank, one mini-batch and one epoch."""

    def __init__(self, model_dir: str, dtype: str, cfg: AlgoConfig, grad_ckpt: bool = False) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        if grad_ckpt:  # exactly what Policy does with ModelConfig.gradient_checkpointing
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        self.ref.eval().requires_grad_(False)
        self.params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=FULL_LR, weight_decay=cfg.weight_decay)

    def _logprobs(self, model: nn.Module, b: Batch) -> Tensor:
        import torch

        mbs = self.cfg.micro_batch_size
        with torch.no_grad():
            return torch.cat([token_logprobs(model, b.input_ids[i:i + mbs], b.attention_mask[i:i + mbs])[0]
                              for i in range(0, b.size, mbs)])

    def step(self, b: Batch) -> dict[str, float]:
        import torch

        from services.learner import algorithms as A

        cfg = self.cfg
        old_lp, ref_lp = self._logprobs(self.model, b), self._logprobs(self.ref, b)
        adv = A.get_advantage_fn(cfg.advantage)(A.AdvantageInputs(
            rewards=b.rewards.float(), response_mask=b.response_mask, group_ids=b.group_index)).advantages
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        gtok, loss, kl = float(b.response_mask.sum()), 0.0, 0.0
        for i in range(0, b.size, cfg.micro_batch_size):
            mb = b.rows(slice(i, i + cfg.micro_batch_size))
            lp, ent = token_logprobs(self.model, mb.input_ids, mb.attention_mask, with_entropy=True)
            s = slice(i, i + cfg.micro_batch_size)
            out = A.policy_loss(
                A.LossInputs(logprobs=lp, old_logprobs=old_lp[s], behaviour_logprobs=mb.behaviour_logprobs,
                             advantages=adv[s], response_mask=mb.response_mask, ref_logprobs=ref_lp[s],
                             entropy=ent),
                clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip_c=cfg.dual_clip_c, tis_cap=cfg.tis_cap,
                kl_coef=cfg.kl_coef, kl_type=cfg.kl_type, entropy_coef=cfg.entropy_coef, agg=cfg.loss_agg,
                global_tokens=gtok, global_seqs=float(b.size))
            out.loss.backward()
            loss += float(out.metrics["loss"])
            kl += float(out.metrics["kl"]) * float(mb.response_mask.sum())
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        return {"actor/loss": loss, "actor/kl": kl / gtok}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one setup, run 1 + steps updates, return timings and memory (in a fresh process)."""
    import torch

    torch.set_num_threads(spec["threads"])
    # Both setups import the same modules, so their baselines compare.
    import peft  # noqa: F401
    import transformers
    from tqdm import tqdm

    from services.learner.config import AlgoConfig, ModelConfig
    from services.learner.policy import Policy
    from services.learner.trainer import Trainer

    transformers.utils.logging.disable_progress_bar()
    baseline = proc_status()
    pressure = LowestMemAvailable()
    torch.manual_seed(0)
    wl = Workload(**spec["workload"])
    batch = synthetic_batch(wl)
    cfg = AlgoConfig(kl_coef=KL_COEF, micro_batch_size=wl.micro_batch)
    t = time.perf_counter()
    if spec["setup"] == "lora":
        policy = Policy(ModelConfig(path=spec["model_dir"], dtype=spec["dtype"], lora_rank=RANK,
                                    lora_alpha=2 * RANK, target_modules="all-linear",
                                    gradient_checkpointing=spec["grad_ckpt"]))
        step, trainable = Trainer(policy, cfg).step, policy.trainable_parameters()
        base_params = sum(p.numel() for p in policy.model.parameters() if not p.requires_grad)
    else:
        ft = FullFinetune(spec["model_dir"], spec["dtype"], cfg, grad_ckpt=spec["grad_ckpt"])
        step, trainable, base_params = ft.step, ft.params, sum(p.numel() for p in ft.params)
    load_s = time.perf_counter() - t
    loaded = proc_status()
    hwm_reset = reset_peak()
    tokens = float(batch.attention_mask.sum())
    times, cpu, first, metrics = [], [], {}, {}
    for i in tqdm(range(1 + spec["steps"]), desc=f"{spec['shape']} {spec['setup']} updates", leave=False,
                  disable=None, position=1):
        t, c = time.perf_counter(), time.process_time()
        metrics = step(batch)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        if i == 0:
            first = {"loss": metrics["actor/loss"], "kl": metrics["actor/kl"]}
    end = proc_status()
    timed, lowest_available = times[1:], pressure.stop()
    at_peak = pressure.at_peak
    peak = max(loaded["VmHWM"], end["VmHWM"])
    model = policy.model if spec["setup"] == "lora" else ft.model
    return {
        "setup": spec["setup"], "includes": includes(spec["setup"], spec["grad_ckpt"]),
        "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
        "malloc_env": {k: os.environ[k] for k in _MALLOC_VARS if k in os.environ},
        "threads": torch.get_num_threads(), "load_s": load_s,
        "base_params": base_params, "trainable_params": sum(p.numel() for p in trainable),
        "tokens_per_update": tokens, "warmup_s": times[0], "step_s": timed,
        "step_s_median": statistics.median(timed), "cpu_s": cpu[1:],
        "cpu_s_median": statistics.median(cpu[1:]), "tok_s": tokens / statistics.median(timed),
        "runs_tok_s": [tokens / s for s in timed], "first_update": first,
        "last_update": {"loss": metrics["actor/loss"], "kl": metrics["actor/kl"]},
        "mem_mb": {"baseline_rss": baseline["VmRSS"], "after_load_rss": loaded["VmRSS"], "peak": peak,
                   "peak_delta": peak - baseline["VmRSS"], "load_peak": loaded["VmHWM"],
                   "train_peak": end["VmHWM"] if hwm_reset else None, "hwm_reset": hwm_reset,
                   "peak_set_by": "training" if end["VmHWM"] >= loaded["VmHWM"] else "loading",
                   "at_sampled_peak": {"rss": at_peak["VmRSS"], "anon": at_peak["RssAnon"],
                                       "file": at_peak["RssFile"]},
                   "end_rss_anon": end["RssAnon"], "end_rss_file": end["RssFile"],
                   "machine_available_min": lowest_available},
    }


def includes(setup: str, grad_ckpt: bool) -> dict[str, Any]:
    """What the setup holds and does, for the JSON."""
    common = {"update": "GRPO advantages, PPO-clip + k3 KL to the reference (coef 0.01), truncated IS, "
                        "AdamW, grad clip; no-grad old/ref log-prob passes then micro-batched forward/backward",
              "gradient_checkpointing": grad_ckpt}
    if setup == "lora":
        return {**common, "code": "services.learner Policy + Trainer",
                "trained": f"peft LoRA r={RANK} alpha={2 * RANK} all-linear (fp32); base frozen",
                "reference": "the same base with the adapter disabled (no second copy)",
                "in_memory": "base weights (mmapped) + adapter + its grads and AdamW states + activations"}
    return {**common, "code": "services.bench.learner.FullFinetune (transformers + torch)",
            "trained": "every parameter", "reference": "a second, frozen copy of the base (mmapped)",
            "in_memory": "weights + reference copy + grads + AdamW exp_avg/exp_avg_sq (all fp32 here) "
                         "+ activations"}


# ------------------------------------------------------------------ the driver


def worker_env(malloc: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _MALLOC_VARS}
    return {**env, **MALLOC_ENVS[malloc]}


def run_worker(spec: dict[str, Any], workdir: Path, malloc: str = "release") -> dict[str, Any]:
    out = workdir / f"{spec['shape']}-{spec['setup']}.json"
    # Its stderr (progress, tracebacks) passes through; the result comes back in a file.
    proc = subprocess.run([sys.executable, "-m", "services.bench.learner", json.dumps(spec), str(out)],
                          env=worker_env(malloc))
    if proc.returncode != 0:
        raise SystemExit(f"bench learner: {spec['shape']} {spec['setup']} failed (exit {proc.returncode})")
    return json.loads(out.read_text())


def machine_info() -> dict[str, Any]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"nproc": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "cpu_model": cpu,
            "mem_bytes": mem, "python": platform.python_version(), "platform": platform.platform(),
            "torch": version("torch"), "transformers": version("transformers"), "peft": version("peft"),
            "loadavg_start": list(os.getloadavg())}


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from tqdm import tqdm

    machine = machine_info()
    results = []
    with tqdm(total=len(args.models) * len(SETUPS), desc="bench learner", disable=None) as bar:
        for shape in args.models:
            model_dir = workdir / shape
            bar.set_postfix_str(f"{shape}: building model")
            build = subprocess.run([sys.executable, "-m", "services.common.tiny_model", str(model_dir), "--shape",
                                    shape, "--dtype", args.dtype], capture_output=True, text=True)
            if build.returncode != 0:
                raise SystemExit(f"bench learner: building the {shape} model failed:\n{build.stderr[-4000:]}")
            wl = asdict(workload(shape, args.micro_batch))
            row: dict[str, Any] = {"model": shape, "dtype": args.dtype, "workload": wl}
            for setup in SETUPS:
                bar.set_postfix_str(f"{shape} {setup}")
                row[setup] = run_worker({"setup": setup, "shape": shape, "model_dir": str(model_dir),
                                         "dtype": args.dtype, "steps": args.steps, "threads": args.threads,
                                         "grad_ckpt": args.grad_ckpt, "workload": wl}, workdir, args.malloc)
                bar.update()
            lo, fu = row["lora"], row["full"]
            row["peak_ratio"] = lo["mem_mb"]["peak"] / fu["mem_mb"]["peak"]
            row["peak_delta_ratio"] = lo["mem_mb"]["peak_delta"] / fu["mem_mb"]["peak_delta"]
            if lo["mem_mb"]["train_peak"] and fu["mem_mb"]["train_peak"]:
                row["train_peak_ratio"] = lo["mem_mb"]["train_peak"] / fu["mem_mb"]["train_peak"]
            row["tok_s_ratio"] = lo["tok_s"] / fu["tok_s"]
            row["goal_met"] = None if shape in GOAL_EXEMPT else row["peak_ratio"] <= GOAL_PEAK_RATIO
            results.append(row)
    machine["loadavg_end"] = list(os.getloadavg())
    return {
        "benchmark": "learner",
        "machine": machine,
        "config": {"models": args.models, "steps": args.steps, "dtype": args.dtype, "threads": args.threads,
                   "quick": args.quick, "gradient_checkpointing": args.grad_ckpt, "malloc": args.malloc,
                   "malloc_env": MALLOC_ENVS[args.malloc], "micro_batch": args.micro_batch, "lora_rank": RANK, "lora_alpha": 2 * RANK, "target_modules": "all-linear",
                   "kl_coef": KL_COEF, "kl_type": "k3", "advantage": "grpo", "group_size": GROUP_SIZE,
                   "lr": {"lora": 1e-3, "full": FULL_LR}, "workloads": {m: asdict(workload(m, args.micro_batch)) for m in args.models}},
        "goals": {"lora_over_full_peak_max": GOAL_PEAK_RATIO, "exempt": list(GOAL_EXEMPT),
                  "met": {r["model"]: r["goal_met"] for r in results if r["goal_met"] is not None}},
        "results": results,
    }


def _goal(met: bool | None) -> str:
    return "n/a" if met is None else "ok" if met else "MISSED"


def report(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["config"]
    menv = " ".join(f"{k}={v}" for k, v in c["malloc_env"].items()) or "no MALLOC_* variables"
    lines = [
        f"loraloop bench learner: {m['nproc']} CPUs ({m['cpu_model']}), torch {m['torch']}, transformers "
        f"{m['transformers']}, peft {m['peft']}; {c['threads']} threads; load average {m['loadavg_start'][0]:.2f} "
        f"at start, {m['loadavg_end'][0]:.2f} at end",
        f"one RL update: GRPO, PPO-clip + k3 KL to the reference (coef {c['kl_coef']}), AdamW; "
        f"lora = r={c['lora_rank']} all-linear, ref = adapter disabled; full = all params, ref = 2nd copy",
        f"settings (both setups): gradient checkpointing {'on' if c['gradient_checkpointing'] else 'off'}; "
        f"malloc {c['malloc']} ({menv}); micro-batch "
        + (str(c["micro_batch"]) if c["micro_batch"] else "per model (batch column)"),
        f"{'model':>5} {'dtype':>8} {'params':>7} {'batch':>13} | {'setup':>5} {'trainable':>9} {'tok/s':>6} "
        f"{'update s':>8} {'cpu s':>7} | {'peak MB':>7} {'load MB':>7} {'anon@pk':>7} {'file@pk':>7} "
        f"{'delta MB':>8} | {'1st loss':>9} {'last kl':>8}",
    ]
    for r in result["results"]:
        w = r["workload"]
        batch = f"{w['seqs']}x{w['tokens']} mb{w['micro_batch']}"
        for i, s in enumerate(SETUPS):
            x, mem = r[s], r[s]["mem_mb"]
            head = (f"{r['model']:>5} {r['dtype']:>8} {x['base_params'] / 1e6:>6.1f}M {batch:>13}" if i == 0
                    else " " * 36)
            pk = mem["at_sampled_peak"]
            lines.append(f"{head} | {s:>5} {x['trainable_params'] / 1e6:>8.2f}M {x['tok_s']:>6.0f} "
                         f"{x['step_s_median']:>8.3f} {x['cpu_s_median']:>7.2f} | {mem['peak']:>7.0f} "
                         f"{mem['load_peak']:>7.0f} {pk['anon']:>7.0f} {pk['file']:>7.0f} {mem['peak_delta']:>8.0f} | "
                         f"{x['first_update']['loss']:>9.2e} {x['last_update']['kl']:>8.5f}")
        lines.append(f"{'':>36} | lora/full: tok/s {r['tok_s_ratio']:.2f}x, peak {r['peak_ratio']:.2f}x "
                     f"(goal <= {GOAL_PEAK_RATIO:g}x: {_goal(r['goal_met'])}), peak delta {r['peak_delta_ratio']:.2f}x")
    lines += [
        f"tok/s = batch tokens / update wall time, median of {c['steps']} after 1 warm-up; cpu s = process CPU "
        "time of that update (all threads);",
        "peak = VmHWM of the setup's own process (max of loading and training: VmHWM is reset after loading); "
        "load = VmHWM once the model(s) are built;",
        "anon@pk / file@pk = RssAnon / RssFile at the highest VmRSS sampled (file = mmapped weights); "
        "delta = peak - RSS after imports",
        "1st loss = the warm-up update's (both start from the base, so it matches); last kl = KL to the "
        f"reference in the last update; goal not checked on {', '.join(GOAL_EXEMPT)}: the runtime is its whole peak",
    ]
    for r in result["results"]:
        for s in SETUPS:
            mem = r[s]["mem_mb"]
            if mem["peak_set_by"] == "loading":
                lines.append(f"NOTE {r['model']} {s}: loading set the peak ({mem['load_peak']:.0f} MB); "
                             f"training alone peaked at {mem['train_peak']:.0f} MB")
            if not mem["hwm_reset"]:
                lines.append(f"NOTE {r['model']} {s}: VmHWM could not be reset after loading; peak covers both")
            low = mem["machine_available_min"]
            if low < LOW_MEM_MB:
                lines.append(f"WARNING {r['model']} {s}: the machine had {low:.0f} MB available at worst; mapped "
                             "weights may have been dropped from memory, so that peak may read low")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="loraloop-bench-learner-"))
    try:
        result = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    emit(report(result), result, args.out)
    return 0


if __name__ == "__main__":
    # The measured process: `python -m services.bench.learner SPEC_JSON RESULT_PATH`.
    Path(sys.argv[2]).write_text(json.dumps(worker(json.loads(sys.argv[1]))))
