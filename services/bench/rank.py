"""`loraloop bench rank`: verl's LoRA rank guidance, measured on the demo task.

verl's LoRA guide says: too small a rank slows convergence; rank >= 32 trains almost like
full fine-tuning; raise the learning rate about 10x for LoRA. This bench trains LoRA ranks 1,
8 and 32 and full fine-tuning from the demo's warm-started model, each at the 10x rule's
learning rate (LoRA 1e-3, the demo's; full 1e-4) and at x1/3 and x3 of it, over seeds, with
the same steps and samples, and writes a page (docs/lora-rank.md), its reward curves (PNG
beside it) and every run's per-step figures (JSON beside it; `--from-json` writes the page
again from that file without training).

One in-process harness for every arm, so that only the parametrisation differs:
  - sampling: HF `generate` from the policy being trained, the demo's data settings
    (DEMO_LEARNER.data: 32 prompts x 8 samples, max_tokens 3, T=1, top-p 1), prompts from
    services/learner/data.py (the arithmetic set, rendered as the learner renders them, in
    its seeded PromptStream order), rewards from services/rollout/rewards.py (`arithmetic`);
  - the update: the project's `Trainer.step` with the demo's algo settings (DEMO_LEARNER.algo:
    GRPO, token-mean, no KL in the loss, one micro-batch, AdamW, grad clip 1), lr per arm;
  - LoRA arms: the project's `Policy` (peft, all-linear) with alpha = 2 x rank, the demo's
    ratio (16/32), so the adapter's scale alpha/r is 2 at every rank;
  - full fine-tuning: `FullPolicy`, which gives `Trainer` what it reads from `Policy`: every
    parameter trains, the reference is a frozen second copy of the base (both loaded by bench
    learner's `FullFinetune`), log-probs from Policy's own `logprobs_from_logits`.
Full fine-tuning cannot go through the rollout servers (they hot-load LoRA adapters only),
hence this harness rather than `loraloop up`. It is synchronous: each batch is sampled by the
policy that is then updated on it (the demo's stack runs one version behind, max_staleness 1).
Seed s sets the prompt order, the LoRA initialisation and the sampling: at one seed every arm
samples its first batch identically (a fresh adapter is the base).

Default budget: 500 steps per run; seeds 0, 1, 2 at the rule's lr and seed 0 at x1/3 and x3,
20 runs. On the 2-core machine one r=32 run at the rule's lr took 87 s (0.17 s/step, one
torch thread; the heaviest LoRA arm, full fine-tuning is a little lighter), so the study takes
about 30 min; three seeds everywhere (36 runs) would take about 50.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from services.common.trajectories import TrajectoryGroupRecord
    from services.learner.config import AlgoConfig
    from services.learner.data import Prompt

RULE_LR = {"lora": 1e-3, "full": 1e-4}  # the 10x rule's point: the demo's LoRA lr, a tenth for full
ALPHA_OVER_RANK = 2  # the demo's lora_alpha / lora_rank (32 / 16)
TARGET = 0.45  # the warm start's 0.15 plus bench peers' 0.3 gain
WINDOW = 20  # steps to target: the 20-step moving mean, as in bench peers (peers.time_to_target)
SAMPLING_SEED = 1_000_003  # offset of the sampling RNG's seed from the run's seed
DEFAULT_WORK = Path.home() / ".cache" / "loraloop" / "bench-rank"


@dataclass(frozen=True)
class Task:
    shape: str  # the model shape (services.common.tiny_model.SHAPES), built and warm-started once
    text: str


TASKS = {
    "arithmetic": Task("tiny", "the demo: `a+b=` with single digits, the two-digit answer exact (reward 1 or 0), "
                               "on the demo's 0.3 M-parameter model warm-started to 0.15 sampled exact match"),
    "arithmetic-25m": Task("25m", "the demo's task on the 25m shape (hidden 512, 8 layers), warm-started the same "
                                  "way (bench peers' model-25m)"),
}


@dataclass(frozen=True)
class Arm:
    """LoRA at `rank` (alpha = ALPHA_OVER_RANK x rank), or full fine-tuning (rank None)."""

    rank: int | None

    @property
    def name(self) -> str:
        return "full" if self.rank is None else f"r{self.rank}"

    @property
    def kind(self) -> str:
        return "full" if self.rank is None else "lora"

    @classmethod
    def parse(cls, s: str) -> Arm:
        s = s.strip().lower()
        return cls(None) if s == "full" else cls(int(s.removeprefix("r")))


def mult_label(m: float) -> str:
    """x1/3, x1, x3: the multiplier of the rule's lr as a short fraction."""
    f = Fraction(m).limit_denominator(10)
    return f"x{f.numerator}" if f.denominator == 1 else f"x{f.numerator}/{f.denominator}"


def _list(p: argparse.ArgumentParser, flag: str, text: str, conv) -> list:
    try:
        out = [conv(x) for x in text.split(",") if x.strip()]
    except (ValueError, ZeroDivisionError):
        p.error(f"{flag}: cannot read {text!r}")
    if not out:
        p.error(f"{flag}: empty")
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="loraloop bench rank",
        description="LoRA ranks against full fine-tuning on the demo task, at the 10x learning-rate rule and a "
                    "sweep around it, over seeds, in one in-process harness (HF generate + the project's "
                    "Trainer.step); writes a page with reward curves, final reward, steps to a target and "
                    "time per step, and the raw per-step results as JSON beside it.")
    p.add_argument("--ranks", default="1,8,32,full", help="LoRA ranks and `full` (default 1,8,32,full)")
    p.add_argument("--lr-mult", default="1/3,1,3",
                   help="multipliers of the rule's lr per arm (LoRA --lora-lr, full --full-lr); default 1/3,1,3")
    p.add_argument("--lora-lr", type=float, default=RULE_LR["lora"], help="the rule's LoRA lr (the demo's 1e-3)")
    p.add_argument("--full-lr", type=float, default=RULE_LR["full"], help="the rule's full fine-tuning lr (1e-4)")
    p.add_argument("--seeds", default="0,1,2", help="seeds at the rule's lr (x1)")
    p.add_argument("--sweep-seeds", default="0",
                   help="seeds at the other multipliers (default 0: the study's 20 runs fit ~30 min here; "
                        "'' = the same as --seeds)")
    p.add_argument("--steps", type=int, default=500,
                   help="training steps per run, every arm alike (default 500: a LoRA r=32 run at the rule's lr "
                        "reached the default target at step 342 and ~0.5 by step 500)")
    p.add_argument("--last", type=int, default=20, help="final reward = mean batch reward of the last N steps")
    p.add_argument("--target", type=float, default=TARGET,
                   help=f"reward target for steps to target ({WINDOW}-step moving mean; default {TARGET})")
    p.add_argument("--task", choices=sorted(TASKS), default="arithmetic", help="; ".join(
        f"{k}: {t.text}" for k, t in TASKS.items()))
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the demo learner's)")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK,
                   help="the model is built and warm-started here once and reused (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("docs/lora-rank.md"),
                   help="the page; its PNG and JSON go beside it (same name, .png and .json)")
    p.add_argument("--from-json", type=Path, help="write the page from this results JSON; no training")
    p.add_argument("--quick", action="store_true",
                   help="smoke: ranks 1 and full, lr x1 (seeds 0,1) and x3 (seed 0), 6 steps")
    a = p.parse_args(argv)
    if a.quick:
        a.ranks, a.lr_mult, a.seeds, a.sweep_seeds, a.steps, a.last = "1,full", "1,3", "0,1", "0", 6, 3
    a.arms = _list(p, "--ranks", a.ranks, Arm.parse)
    a.mults = _list(p, "--lr-mult", a.lr_mult, lambda x: float(Fraction(x.strip())))
    a.seed_list = _list(p, "--seeds", a.seeds, int)
    a.sweep_seed_list = _list(p, "--sweep-seeds", a.sweep_seeds, int) if a.sweep_seeds.strip() else a.seed_list
    if any(arm.rank is not None and arm.rank < 1 for arm in a.arms) or any(m <= 0 for m in a.mults):
        p.error("ranks and lr multipliers must be > 0")
    if a.steps < 1 or a.last < 1 or a.threads < 1 or a.last > a.steps:
        p.error("--steps, --last and --threads must be >= 1, and --last <= --steps")
    return a


@dataclass(frozen=True)
class RunSpec:
    arm: Arm
    mult: float
    lr: float
    seed: int


def plan(arms: list[Arm], mults: list[float], seeds: list[int], sweep_seeds: list[int],
         rule_lr: dict[str, float]) -> list[RunSpec]:
    """Every (arm, lr, seed) to run: the rule's lr (x1) for every arm and seed first, then the
    sweep, so that a study stopped early still has the rule's comparison."""
    def spec(a: Arm, m: float, s: int) -> RunSpec:
        return RunSpec(a, m, float(f"{rule_lr[a.kind] * m:.6g}"), s)

    return [spec(a, m, s) for m in mults if m == 1 for a in arms for s in seeds] + \
        [spec(a, m, s) for m in mults if m != 1 for a in arms for s in sweep_seeds]


# ------------------------------------------------------------------ the harness


class FullPolicy:
    """Full fine-tuning with what `Trainer` reads from `Policy`: every parameter of `model`
    trains (Trainer's AdamW over `actor_parameters`), and the reference is `ref`, a frozen
    second copy of the base. Both are loaded by bench learner's `FullFinetune` (its own
    optimizer is not used); log-probs come from `logprobs_from_logits`, as Policy's do."""

    critic = False
    rank, world = 0, 1

    def __init__(self, model_dir: str | Path, algo: AlgoConfig) -> None:
        import torch

        from services.bench.learner import FullFinetune

        ft = FullFinetune(str(model_dir), "float32", algo)
        self.model, self.ref, self._params = ft.model, ft.ref, ft.params
        self.root = self.model
        self.device = torch.device("cpu")
        self._in_reference = False

    def actor_parameters(self) -> list:
        return self._params

    def critic_parameters(self) -> list:
        return []

    def trainable_parameters(self) -> list:
        return self._params

    @contextlib.contextmanager
    def reference(self):
        self._in_reference = True
        try:
            yield
        finally:
            self._in_reference = False

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                       with_entropy: bool = False, entropy_grad: bool = False,
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from services.learner.policy import logprobs_from_logits

        model = self.ref if self._in_reference else self.model
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logprobs_from_logits(logits, input_ids, temperature, with_entropy, entropy_grad)


def build_policy(model_dir: Path, arm: Arm, algo: AlgoConfig):
    """The project's Policy at the arm's rank (the demo's other model settings), or FullPolicy."""
    if arm.rank is None:
        return FullPolicy(model_dir, algo)
    from services.learner.config import ModelConfig
    from services.learner.policy import Policy
    from services.stack_config import DEMO_LEARNER

    cfg = ModelConfig(**{**DEMO_LEARNER.model.model_dump(), "path": str(model_dir), "lora_rank": arm.rank,
                         "lora_alpha": float(ALPHA_OVER_RANK * arm.rank)})
    return Policy(cfg)


def sample_groups(model, tokenizer, prompts: list[tuple[Prompt, list[int]]], n: int, max_tokens: int,
                  temperature: float, top_p: float, reward_fn) -> list[TrajectoryGroupRecord]:
    """`n` samples of each prompt from HF `generate` (left-padded batch), each cut after its
    first end-of-sequence token as the rollout engine returns it, with its behaviour
    log-probs (of the distribution sampled from) and its reward (rewards.score on the text
    decoded without special tokens, as vLLM's is)."""
    import torch

    from services.common.trajectories import SampleRecord, TrajectoryGroupRecord
    from services.rollout.rewards import score

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    rows = [ids for _, ids in prompts for _ in range(n)]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        attention[i, width - len(ids):] = 1
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=True,
                             temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_tokens,
                             pad_token_id=pad, eos_token_id=eos, return_dict_in_generate=True, output_scores=True)
    new = out.sequences[:, width:]
    logp = torch.stack(out.scores, 1).float().log_softmax(-1).gather(-1, new[..., None]).squeeze(-1)
    groups = []
    for g, (prompt, ids) in enumerate(prompts):
        samples = []
        for i in range(g * n, (g + 1) * n):
            toks = new[i].tolist()
            k = toks.index(eos) + 1 if eos in toks else len(toks)
            text = tokenizer.decode(toks[:k], skip_special_tokens=True)
            r = score(reward_fn, prompt.data_source, text, prompt.ground_truth, prompt.extra_info)
            samples.append(SampleRecord(tuple(toks[:k]), tuple(logp[i, :k].tolist()), r.score, adapter_version=0))
        groups.append(TrajectoryGroupRecord(lease_id="", group_id=f"{prompt.uid}:{g}", prompt_token_ids=tuple(ids),
                                            adapter_name="", samples=tuple(samples)))
    return groups


def run_one(model_dir: Path, spec: RunSpec, steps: int) -> dict[str, Any]:
    """One (arm, lr, seed): `steps` of sample -> Trainer.step; per-step reward and timings."""
    import torch
    from transformers import AutoTokenizer

    from services.learner.batch import collate
    from services.learner.config import AlgoConfig
    from services.learner.data import PromptStream, load_prompts, render
    from services.learner.trainer import Trainer
    from services.rollout.rewards import load_reward_fn
    from services.stack_config import DEMO_LEARNER

    d = DEMO_LEARNER.data
    algo = AlgoConfig(**{**DEMO_LEARNER.algo.model_dump(), "lr": spec.lr})
    t0 = time.perf_counter()
    torch.manual_seed(spec.seed)  # LoRA's A initialisation
    policy = build_policy(model_dir, spec.arm, algo)
    trainer = Trainer(policy, algo, temperature=d.temperature, max_len=d.max_tokens)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    load_s = time.perf_counter() - t0
    stream = PromptStream(load_prompts(d.dataset), seed=spec.seed)
    reward_fn = load_reward_fn(d.reward_fn)
    rendered: dict[str, list[int]] = {}
    torch.manual_seed(spec.seed + SAMPLING_SEED)  # the same sampling draws in every arm at this seed
    out: dict[str, list] = {"reward": [], "gen_s": [], "update_s": [], "entropy": [], "grad_norm": [], "kl": []}
    for step in range(1, steps + 1):
        t = time.perf_counter()
        prompts = stream.next_batch(d.groups_per_step)
        for p in prompts:
            if p.uid not in rendered:
                rendered[p.uid] = render(p, tokenizer)[1]
        groups = sample_groups(policy.model, tokenizer, [(p, rendered[p.uid]) for p in prompts], d.samples_per_group,
                               d.max_tokens, d.temperature, d.top_p, reward_fn)
        batch = collate(groups, pad_id=tokenizer.pad_token_id)
        t_gen = time.perf_counter() - t
        m = trainer.step(batch)
        out["gen_s"].append(round(t_gen, 5))
        out["update_s"].append(round(time.perf_counter() - t - t_gen, 5))
        out["reward"].append(round(float(batch.rewards.mean()), 6))
        out["entropy"].append(round(m.get("actor/entropy", float("nan")), 5))
        out["grad_norm"].append(round(m.get("actor/grad_norm", float("nan")), 5))
        if "actor/kl" in m:
            out["kl"].append([step, round(m["actor/kl"], 6)])
    return {"arm": spec.arm.name, "kind": spec.arm.kind, "rank": spec.arm.rank,
            "alpha": None if spec.arm.rank is None else ALPHA_OVER_RANK * spec.arm.rank,
            "lr": spec.lr, "mult": spec.mult, "seed": spec.seed,
            "trainable_params": sum(p.numel() for p in policy.actor_parameters()),
            "load_s": round(load_s, 3), "wall_s": round(time.perf_counter() - t0, 3),
            "loadavg_1m": os.getloadavg()[0], **out}


# ------------------------------------------------------------------ the study


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def run_study(a: argparse.Namespace, json_path: Path, argv: list[str]) -> dict[str, Any]:
    """Every planned run, one after the other in this process; the JSON is rewritten after
    each run, so a study stopped early keeps what it finished (`--from-json` reads it)."""
    import torch

    torch.set_num_threads(a.threads)
    import transformers

    from services.bench.learner import machine_info
    from services.bench.peers import build_model
    from services.stack_config import DEMO_LEARNER

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    task = TASKS[a.task]
    a.work_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(a.work_dir.resolve(), task.shape)
    warm = model / "warm_start.json"
    rule = {"lora": a.lora_lr, "full": a.full_lr}
    specs = plan(a.arms, a.mults, a.seed_list, a.sweep_seed_list, rule)
    d, algo = DEMO_LEARNER.data, DEMO_LEARNER.algo
    result: dict[str, Any] = {
        "benchmark": "rank",
        "command": "loraloop bench rank" + ("" if not argv else " " + " ".join(argv)),
        "commit": commit(), "machine": machine_info(), "threads": torch.get_num_threads(),
        "config": {"task": a.task, "task_text": task.text, "shape": task.shape, "model": str(model),
                   "warm_start": json.loads(warm.read_text()) if warm.is_file() else None,
                   "arms": [arm.name for arm in a.arms], "mults": a.mults, "rule_lr": rule,
                   "seeds": a.seed_list, "sweep_seeds": a.sweep_seed_list, "steps": a.steps, "last": a.last,
                   "target": a.target, "window": WINDOW, "alpha_over_rank": ALPHA_OVER_RANK,
                   "quick": a.quick, "data": d.model_dump(), "algo": algo.model_dump(),
                   "target_modules": DEMO_LEARNER.model.target_modules},
        "runs": [], "study_s": None,
    }
    print(f"bench rank: {len(specs)} runs of {a.steps} steps on {a.task} ({task.shape} model {model}), "
          f"{a.threads} thread(s); results -> {json_path}", flush=True)
    t0 = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        r = run_one(model, spec, a.steps)
        result["runs"].append(r)
        result["study_s"] = round(time.perf_counter() - t0, 1)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result) + "\n")
        hit = steps_to_target(r["reward"], a.target)
        left = (len(specs) - i) * result["study_s"] / i
        print(f"[{i}/{len(specs)}] {spec.arm.name:>4} lr {spec.lr:.3g} ({mult_label(spec.mult)}) seed {spec.seed}: "
              f"reward first {min(WINDOW, a.steps)} {statistics.fmean(r['reward'][:WINDOW]):.3f}, last {a.last} "
              f"{final_reward(r['reward'], a.last):.3f}, target {a.target:g} "
              f"{f'at step {hit}' if hit else 'not reached'}; {step_s(r):.3f} s/step, {r['wall_s']:.0f} s "
              f"(~{left / 60:.0f} min left)", flush=True)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    json_path.write_text(json.dumps(result) + "\n")
    return result


# ------------------------------------------------------------------ the figures


def final_reward(rewards: list[float], last: int) -> float:
    """Mean batch reward of the last `last` steps."""
    return statistics.fmean(rewards[-last:])


def steps_to_target(rewards: list[float], target: float) -> int | None:
    """The first step (1-based) at which the WINDOW-step moving mean of the batch reward
    reaches `target` (bench peers' definition); None if it never does."""
    from services.bench.peers import time_to_target

    hit = time_to_target([{"step": k, "time": 0.0, "r": r} for k, r in enumerate(rewards, 1)], "r", target)
    return hit[0] if hit else None


def step_s(run: dict[str, Any]) -> float:
    """Median wall time of a step: sampling (generate, rewards, collate) plus Trainer.step."""
    return statistics.median(g + u for g, u in zip(run["gen_s"], run["update_s"], strict=True))


def median_steps(values: list[int | None]) -> float | None:
    """Median over seeds, a seed that never reached the target counting as never: None when
    the median falls on such a seed (for an even count, either middle one)."""
    xs = sorted(math.inf if v is None else v for v in values)
    k = len(xs)
    med = xs[k // 2] if k % 2 else (xs[k // 2 - 1] + xs[k // 2]) / 2
    return None if math.isinf(med) else med


def summarise(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (arm, lr): final reward over seeds (mean, sample std), steps to target,
    time per step (median over every step of its runs)."""
    c = result["config"]
    rows: dict[tuple[str, float], dict[str, Any]] = {}
    for r in result["runs"]:
        row = rows.setdefault((r["arm"], r["lr"]), {
            "arm": r["arm"], "kind": r["kind"], "rank": r["rank"], "alpha": r["alpha"], "lr": r["lr"],
            "mult": r["mult"], "trainable_params": r["trainable_params"], "seeds": [], "finals": [],
            "target_steps": [], "_steps": [], "_updates": [], "_gens": []})
        row["seeds"].append(r["seed"])
        row["finals"].append(final_reward(r["reward"], c["last"]))
        row["target_steps"].append(steps_to_target(r["reward"], c["target"]))
        row["_steps"] += [g + u for g, u in zip(r["gen_s"], r["update_s"], strict=True)]
        row["_updates"] += r["update_s"]
        row["_gens"] += r["gen_s"]
    out = []
    for row in rows.values():
        f = row["finals"]
        row.update(n=len(f), final_mean=statistics.fmean(f), final_std=statistics.stdev(f) if len(f) > 1 else None,
                   target_median=median_steps(row["target_steps"]),
                   reached=sum(s is not None for s in row["target_steps"]),
                   s_per_step=statistics.median(row.pop("_steps")), update_s=statistics.median(row.pop("_updates")),
                   gen_s=statistics.median(row.pop("_gens")))
        out.append(row)
    order = {name: i for i, name in enumerate(c["arms"])}
    return sorted(out, key=lambda x: (order.get(x["arm"], 99), x["lr"]))


def arm_std(rows: list[dict[str, Any]], arm: str) -> float | None:
    """Per-seed std of an arm's final reward, pooled over its lrs run with >= 2 seeds."""
    parts = [(r["n"] - 1, r["final_std"] ** 2) for r in rows if r["arm"] == arm and r["n"] > 1]
    dof = sum(k for k, _ in parts)
    return math.sqrt(sum(k * v for k, v in parts) / dof) if dof else None


def compare_final(a: dict[str, Any], b: dict[str, Any], rows: list[dict[str, Any]]) -> str | None:
    """`higher`, `lower` or `same` (a against b): a difference counts when it exceeds twice its
    standard error, sqrt(sa^2/na + sb^2/nb), each arm's per-seed std pooled (arm_std); None
    without an std (one seed everywhere)."""
    sa, sb = arm_std(rows, a["arm"]), arm_std(rows, b["arm"])
    if sa is None or sb is None:
        return None
    diff, se = a["final_mean"] - b["final_mean"], math.sqrt(sa ** 2 / a["n"] + sb ** 2 / b["n"])
    return "same" if abs(diff) <= 2 * se else "higher" if diff > 0 else "lower"


def compare_steps(a: float | None, b: float | None) -> str:
    """`slower`, `faster`, `same` (within 10%) or `neither` (a against b; None = not reached)."""
    if a is None and b is None:
        return "neither"
    if a is None or b is None:
        return "slower" if a is None else "faster"
    return "same" if abs(a - b) <= 0.1 * min(a, b) else "slower" if a > b else "faster"


def best_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each arm's lr with the highest mean final reward."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["arm"] not in best or r["final_mean"] > best[r["arm"]]["final_mean"]:
            best[r["arm"]] = r
    return best


def _final(row: dict[str, Any]) -> str:
    sd = row["final_std"]
    return f"{row['final_mean']:.3f} ± {sd:.3f}" if sd is not None else f"{row['final_mean']:.3f} (1 seed)"


def _steps(row: dict[str, Any]) -> str:
    med = row["target_median"]
    return f"{'not reached' if med is None else f'{med:.0f}'} ({row['reached']}/{row['n']} reached)"


def _at(row: dict[str, Any]) -> str:
    return f"lr {row['lr']:.3g} ({mult_label(row['mult'])})"


def _steps_phrase(st: str, a: str, b: str, sa: float | None, sb: float | None) -> str:
    """How a's median steps to target compare with b's (compare_steps' word `st`)."""
    if st == "neither":
        return f"neither {a} nor {b} reached the target"
    if sa is None or sb is None:
        return f"{a} did not reach the target and {b} did" if sa is None else f"{a} reached the target and {b} did not"
    word = {"same": "as soon as", "slower": "later than", "faster": "sooner than"}[st]
    return f"{a} reached the target {word} {b} (step {sa:.0f} against {sb:.0f})"


def _final_phrase(fi: str | None, a: str, b: str) -> str:
    return {"same": f"{a} ended level with {b} (within 2 standard errors)", "lower": f"{a} ended lower than {b}",
            "higher": f"{a} ended higher than {b}", None: f"no noise estimate for {a} against {b} (one seed)"}[fi]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def findings(rows: list[dict[str, Any]]) -> list[str]:
    """The guide's three claims against the data, each with its figures and a verdict by the
    rules the page states (compare_final, compare_steps); arms compared at their best lr."""
    best = best_rows(rows)
    lora = sorted((r for r in best.values() if r["kind"] == "lora"), key=lambda r: r["rank"])
    full = best.get("full")
    out = []
    if len(lora) >= 2:
        lo, hi = lora[0], lora[-1]
        a, b = f"r={lo['rank']}", f"r={hi['rank']}"
        st, fi = compare_steps(lo["target_median"], hi["target_median"]), compare_final(lo, hi, rows)
        slow, fast = st == "slower" or fi == "lower", st == "faster" or fi == "higher"
        verdict = "mixed" if slow and fast else "holds here" if slow else \
            "undecided" if fi is None else "does not hold here"
        out.append(f"- **\"Too small a rank slows convergence.\"** {_cap(verdict)}: "
                   f"{_steps_phrase(st, a, b, lo['target_median'], hi['target_median'])}, and "
                   f"{_final_phrase(fi, a, b)}. At each rank's best lr: "
                   + "; ".join(f"r={r['rank']} ({_at(r)}) final {_final(r)}, steps to target {_steps(r)}"
                               for r in lora) + ".")
    for r in (r for r in lora if r["rank"] >= 32 and full):
        a = f"r={r['rank']}"
        st, fi = compare_steps(r["target_median"], full["target_median"]), compare_final(r, full, rows)
        verdict = "holds here" if st in ("same", "neither") and fi == "same" else \
            "undecided" if fi is None and st in ("same", "neither") else "does not hold here"
        out.append(f"- **\"Rank >= 32 trains almost like full fine-tuning.\"** {_cap(verdict)}: "
                   f"{_steps_phrase(st, a, 'full fine-tuning', r['target_median'], full['target_median'])}, and {_final_phrase(fi, a, 'full fine-tuning')}. "
                   f"{a} at {_at(r)}: final {_final(r)}, steps to target {_steps(r)}, {r['s_per_step']:.3f} s/step; "
                   f"full fine-tuning at {_at(full)}: final {_final(full)}, steps to target {_steps(full)}, "
                   f"{full['s_per_step']:.3f} s/step.")
    if lora and full:
        parts, agree = [], []
        for b in lora:
            mine = [r for r in rows if r["arm"] == b["arm"]]
            rule = next((r for r in mine if math.isclose(r["lr"], 10 * full["lr"], rel_tol=1e-6)), None)
            cmp = None if rule is None else "same" if rule is b else compare_final(rule, b, rows)
            agree.append(cmp == "same")
            head = f"r={b['rank']} was best at lr {b['lr']:.3g}, {b['lr'] / full['lr']:.3g}x full's best{_edge(b, mine)}"
            if rule is None:
                parts.append(f"{head}; 10x full's best was not run")
            elif rule is not b:
                word = {"same": "level", "lower": "lower", "higher": "higher", None: "no noise estimate"}[cmp]
                parts.append(f"{head}; at 10x full's best ({rule['lr']:.3g}) it ended at {_final(rule)}, {word}")
            else:
                parts.append(head)
        verdict = "holds here" if all(agree) else "does not hold here" if not any(agree) else "holds for some ranks"
        fulls = [r for r in rows if r["arm"] == "full"]
        out.append(f"- **\"Raise the learning rate about 10x for LoRA.\"** {_cap(verdict)} (a rank agrees when LoRA at "
                   "10x full fine-tuning's best lr ends level with that rank's best, within 2 standard errors). "
                   f"Full fine-tuning was best at lr {full['lr']:.3g}{_edge(full, fulls)}; " + "; ".join(parts) + ".")
    return out


def _edge(row: dict[str, Any], mine: list[dict[str, Any]]) -> str:
    lrs = [r["lr"] for r in mine]
    at_edge = len(lrs) > 1 and row["lr"] in (min(lrs), max(lrs))
    return " (at the edge of its sweep: the best may lie beyond)" if at_edge else ""


def table(rows: list[dict[str, Any]], c: dict[str, Any]) -> list[str]:
    best = {id(r) for r in best_rows(rows).values()}
    lines = [f"| arm | trainable params | lr | | seeds | final reward (last {c['last']}, mean ± std) | steps to "
             f"{c['target']:g} (median) | reached | s/step | of which update |",
             "|---|---:|---:|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        name = "full" if r["rank"] is None else f"r={r['rank']}, alpha={r['alpha']}"
        mark = mult_label(r["mult"]) + (" (rule)" if math.isclose(r["mult"], 1.0) else "")
        final = f"**{_final(r)}**" if id(r) in best else _final(r)
        med = "not reached" if r["target_median"] is None else f"{r['target_median']:.0f}"
        lines.append(f"| {name} | {r['trainable_params']:,} | {r['lr']:.3g} | {mark} | "
                     f"{','.join(map(str, r['seeds']))} | {final} | {med} | {r['reached']}/{r['n']} | "
                     f"{r['s_per_step']:.3f} | {r['update_s']:.3f} |")
    return lines


def plot(result: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> Path:
    """Per arm, the WINDOW-step moving mean of the batch reward, mean over seeds (band: min to
    max over seeds), one line per lr; then every arm at the rule's lr, and at its best lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = result["config"]
    curves: dict[tuple[str, float], list[list[float]]] = {}
    for r in result["runs"]:
        curves.setdefault((r["arm"], r["lr"]), []).append(moving_mean(r["reward"], WINDOW))

    def draw(ax, key, label, color) -> None:
        ys = curves[key]
        n = min(map(len, ys))
        xs = range(1, n + 1)
        ax.plot(xs, [statistics.fmean(y[k] for y in ys) for k in range(n)], color=color, lw=1.6,
                label=f"{label} ({len(ys)} seed{'s' if len(ys) > 1 else ''})")
        if len(ys) > 1:
            ax.fill_between(xs, [min(y[k] for y in ys) for k in range(n)], [max(y[k] for y in ys) for k in range(n)],
                            color=color, alpha=0.15, lw=0)

    arms = [a for a in c["arms"] if any(r["arm"] == a for r in rows)]
    mults = sorted({r["mult"] for r in rows})
    cmap = plt.get_cmap("viridis")
    mcolor = {m: cmap(0.15 + 0.7 * i / max(1, len(mults) - 1)) for i, m in enumerate(mults)}
    acolor = {a: plt.get_cmap("tab10")(i) for i, a in enumerate(arms)}
    panels = len(arms) + 2
    cols = 3 if panels > 4 else 2
    fig, axes = plt.subplots(math.ceil(panels / cols), cols, figsize=(4.6 * cols, 3.4 * math.ceil(panels / cols)),
                             constrained_layout=True, sharey=True, squeeze=False)
    flat = list(axes.flat)
    for ax, arm in zip(flat, arms, strict=False):
        for r in (r for r in rows if r["arm"] == arm):
            draw(ax, (arm, r["lr"]), f"lr {r['lr']:.3g} {mult_label(r['mult'])}", mcolor[r["mult"]])
        ax.set_title(_arm_title(rows, arm))
    rule = flat[len(arms)]
    for arm in arms:
        r = next((r for r in rows if r["arm"] == arm and math.isclose(r["mult"], 1.0)), None)
        if r:
            draw(rule, (arm, r["lr"]), f"{arm} lr {r['lr']:.3g}", acolor[arm])
    rule.set_title("every arm at the 10x rule's lr")
    bestax = flat[len(arms) + 1]
    for arm, r in best_rows(rows).items():
        draw(bestax, (arm, r["lr"]), f"{arm} lr {r['lr']:.3g}", acolor[arm])
    bestax.set_title("every arm at its best lr (final reward)")
    for ax in flat[:panels]:
        ax.axhline(c["target"], color="grey", ls=":", lw=1)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in flat[panels:]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel(f"batch reward, {WINDOW}-step mean")
    fig.suptitle(f"LoRA rank vs full fine-tuning: {c['task']} ({c['shape']} model), {c['steps']} steps x "
                 f"{c['data']['groups_per_step']}x{c['data']['samples_per_group']} samples; dotted: target")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _arm_title(rows: list[dict[str, Any]], arm: str) -> str:
    r = next(r for r in rows if r["arm"] == arm)
    return ("full fine-tuning" if r["rank"] is None else f"LoRA r={r['rank']}, alpha={r['alpha']}") + \
        f" ({r['trainable_params']:,} params)"


def moving_mean(xs: list[float], w: int) -> list[float]:
    """Trailing mean over the last `w` values (fewer at the start)."""
    return [statistics.fmean(xs[max(0, k - w + 1):k + 1]) for k in range(len(xs))]


# ------------------------------------------------------------------ the page


def write_page(result: dict[str, Any], rows: list[dict[str, Any]], page: Path) -> str:
    """The page's markdown; its figure and raw results are `page`'s .png and .json."""
    from services.common.tiny_model import SHAPES

    c, m = result["config"], result["machine"]
    d, algo = c["data"], c["algo"]
    png, raw = page.with_suffix(".png").name, page.with_suffix(".json").name
    hidden = SHAPES[c["shape"]]["hidden_size"]
    arms = {r["arm"]: r for r in rows}
    lora = sorted((r for r in arms.values() if r["kind"] == "lora"), key=lambda r: r["rank"])
    runs, steps = len(result["runs"]), c["steps"]
    mults = ", ".join(mult_label(x) for x in c["mults"])
    sweep = [x for x in c["mults"] if x != 1]
    seeds = ", ".join(map(str, c["seeds"]))
    per_run = [r["loadavg_1m"] for r in result["runs"] if "loadavg_1m" in r]
    loads = f"{min(per_run):.1f}-{max(per_run):.1f}" if per_run else "?"
    lines = [
        "# LoRA rank against full fine-tuning, measured (issue 18)", "",
        f"Written by `{result['command']}` at commit {result['commit']}: {runs} runs in "
        f"{(result['study_s'] or 0) / 60:.1f} min on {m['cpus_usable']} cores ({m['cpu_model']}), "
        f"{result['threads']} torch thread(s), 1-minute load average {loads} at the end of the runs (the time per "
        f"step reads high while others use the machine); torch {m['torch']}, transformers "
        f"{m['transformers']}, peft {m['peft']}. `loraloop bench rank --from-json {page.with_suffix('.json')} --out "
        f"{page}` writes this page and its figure again from the raw results ([{raw}]({raw})).", "",
    ]
    if c["quick"]:
        lines += ["**Smoke run (`--quick`): a few steps. These figures show the bench runs; they measure nothing.**", ""]
    lines += [
        "verl's LoRA guide says: too small a rank slows convergence; rank >= 32 trains almost like full "
        "fine-tuning; raise the learning rate about 10x for LoRA. This page measures the three claims on "
        "the demo task, with the same budget of steps and samples for every arm.", "",
        "## Setup", "",
        f"- **Task**: `{c['task']}`, {c['task_text']}"
        + (f" (warm start: {c['warm_start']['steps']} steps, sampled exact match "
           f"{c['warm_start']['sampled_exact_match']:.2f})" if c.get("warm_start") else "") + ".",
        "- **Arms**: " + "; ".join(f"LoRA r={r['rank']}, alpha={r['alpha']} ({r['trainable_params']:,} trainable "
                                   "parameters)" for r in lora)
        + (f"; full fine-tuning ({arms['full']['trainable_params']:,} parameters, every one trained)"
           if "full" in arms else "") + f". LoRA on every linear layer of the decoder (`{c['target_modules']}`, "
        "the demo's; the tied embedding and output head stay frozen, where full fine-tuning trains them), "
        f"alpha = {c['alpha_over_rank']} x rank at every rank, the demo's ratio (r=16, alpha=32): the adapter's "
        f"scale alpha/r is {c['alpha_over_rank']} at every rank (not rsLoRA's alpha/sqrt(r)).",
        f"- **Learning rates**: the 10x rule's point is the demo's LoRA lr {c['rule_lr']['lora']:g} and "
        f"{c['rule_lr']['full']:g} for full fine-tuning; each arm runs at {mults} of its own rule lr.",
        f"- **Seeds**: {seeds} at the rule's lr" + (f"; {', '.join(map(str, c['sweep_seeds']))} at "
                                                    f"{', '.join(mult_label(x) for x in sweep)}" if sweep else "")
        + ". A seed fixes the prompt order, the LoRA initialisation and the sampling: at one seed every arm "
        "samples the same first batch (a fresh adapter is the base model).",
        f"- **Budget**: {steps} steps per run, each {d['groups_per_step']} prompts x {d['samples_per_group']} "
        f"samples ({d['groups_per_step'] * d['samples_per_group']} samples, up to {d['max_tokens']} tokens, "
        f"T={d['temperature']:g}), one update per batch, for every arm"
        + ("; the sweep runs fewer seeds to keep the study near its time budget"
           if sweep and len(c["sweep_seeds"]) < len(c["seeds"]) else "") + ".",
        "- **One harness, one code path** (`services/bench/rank.py`): each step samples the groups with HF "
        "`generate` from the policy being trained (the demo's prompts from `services/learner/data.py`, its "
        "reward from `services/rollout/rewards.py`), then runs the project's `Trainer.step` with the demo's "
        f"GRPO settings ({algo['advantage']}, {algo['loss_agg']}, kl_coef {algo['kl_coef']:g}, one micro-batch "
        f"of {algo['micro_batch_size']}, AdamW, grad clip {algo['grad_clip']:g}) at the arm's lr. LoRA arms are "
        "the project's `Policy`; full fine-tuning is `FullPolicy` (every parameter trains, the reference is a "
        "frozen second copy of the base, log-probs by Policy's own function), handed to the same "
        "`Trainer`. Only the parametrisation differs. Full fine-tuning cannot go through the rollout servers "
        "(they hot-load LoRA adapters only), hence an in-process harness instead of `loraloop up`; it is "
        "synchronous (the demo's stack samples one adapter version behind).",
        f"- **Figures**: final reward = mean batch reward (sampled, T={d['temperature']:g}) of the last "
        f"{c['last']} steps, then mean ± sample std over seeds; steps to target = the first step at which the "
        f"{c['window']}-step moving mean of the batch reward reaches {c['target']:g}"
        + (" (the warm start's 0.15 plus bench peers' 0.3 gain)" if c["target"] == TARGET else "")
        + ", median over seeds with a seed that never reaches it counted as never; s/step = "
        "median wall time of a step (sampling + update), `of which update` = `Trainer.step` alone.", "",
        "## Reward curves", "", f"![reward curves per arm and learning rate]({png})", "",
        "Each line is the mean over seeds of the 20-step moving mean; the band spans the seeds. Bold in the "
        "table: each arm's best lr by final reward.", "",
        "## Results", "", *table(rows, c), "",
        "## What the data says", "",
        "Rules: two final rewards differ when the gap exceeds twice its standard error, sqrt(s_a^2/n_a + "
        "s_b^2/n_b), with each arm's per-seed std pooled over its learning rates run with two seeds or more; "
        "two steps-to-target medians differ by more than 10%. These are few seeds: a rough bar.", "",
        *findings(rows), "",
        "## Caveats", "",
        f"- The model is tiny (hidden {hidden}): r=32 is a quarter of the narrowest adapted layer's input width, "
        "and 100 distinct problems can be memorised. The guide speaks of models of billions of parameters, "
        "where r=32 is a far smaller fraction of a layer.",
        "- Sampling is HF `generate` on the learner's own weights and the loop is synchronous, where the demo's "
        "stack samples with vLLM one adapter version behind: the demo's numbers are not this page's.",
        "- The lr sweep has three points per arm; a best lr at the edge of its sweep may lie beyond it. With "
        "alpha/r fixed, an Adam step at one lr changes the weights more at a higher rank (more directions "
        "move), so a rank's effect at one lr is partly an effective-lr effect: compare arms at their best lr.", "",
    ]
    return "\n".join(lines)


def report(rows: list[dict[str, Any]], c: dict[str, Any]) -> str:
    return "\n".join([*table(rows, c), "", *findings(rows)])


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    page = a.out
    png, raw = page.with_suffix(".png"), page.with_suffix(".json")
    if a.from_json:
        result = json.loads(a.from_json.read_text())
        if a.from_json.resolve() != raw.resolve():
            raw.parent.mkdir(parents=True, exist_ok=True)
            raw.write_text(json.dumps(result) + "\n")
    else:
        result = run_study(a, raw, argv)
    if not result["runs"]:
        raise SystemExit(f"bench rank: no runs in {a.from_json or raw}")
    rows = summarise(result)
    plot(result, rows, png)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(write_page(result, rows, page))
    print(report(rows, result["config"]))
    print(f"\nwrote {page}, {png}, {raw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
