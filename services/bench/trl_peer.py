"""TRL's GRPOTrainer + peft LoRA on loraloop's tiny arithmetic demo: the peer side of
`loraloop bench peers`.

STANDALONE: this file runs inside the TRL venv that `services/bench/peer_env.py` builds,
where loraloop is not installed. It imports only the stdlib at module level (so tests can
load it by path without TRL) and torch, transformers, peft, trl and datasets inside `main`.

The workload mirrors loraloop's demo (services/stack_config.py DEMO_LEARNER) setting by
setting:
  - prompts: the file written by `peer_env.write_prompts_jsonl`, rendered by loraloop's
    `render`; TRL tokenises the plain-string prompt itself (no chat template, special tokens
    added: <bos>), and the ids are checked against loraloop's before training starts;
  - GRPO advantages (r - group mean) / (group std + eps), std unbiased on both sides. TRL's
    eps is a fixed 1e-4, loraloop's 1e-6: it only matters for groups whose std is ~0, whose
    advantages are 0 on both sides anyway;
  - one optimizer step per generation batch (num_iterations=1, generation aligned with the
    optimizer step, so TRL skips the old-logprob forward as loraloop's synchronous step
    does), token-mean loss over the whole batch (TRL's "dapo": per-token losses summed and
    divided by the active tokens of the global accumulated batch), no KL (beta=0, no
    reference model), PPO clip 0.2 (inactive: the ratio is 1 on-policy);
  - AdamW at a constant lr (no warmup or decay), weight decay 0, grad-norm clip 1.0 (TRL's
    and loraloop's default), fp32 everywhere, no gradient checkpointing (GRPOConfig turns
    it on by default; loraloop's demo has it off);
  - sampling with transformers `generate` at temperature 1 (no vLLM), `max_new_tokens`, and
    `min_new_tokens` for the generation-heavy workload (EOS suppressed until then);
  - reward: loraloop's `arithmetic_exact`, reproduced below, on the completion as TRL
    decodes it (cut after the first EOS, special tokens skipped: what vLLM hands loraloop).

Output: one JSON line per optimizer step, {"step", "time" (s since training began, wall),
"step_s", "reward_mean", ...}, then {"summary": true, "peak_rss_mb", "train_s", "steps",
...}. Prints `trl-peer step N/M ...` after every step for the caller's progress lines.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------ the reward (loraloop's)

_SPECIAL_TOKENS = ("<pad>", "<bos>")


def arithmetic_exact(data_source: str, solution_str: str, ground_truth: str,
                     extra_info: dict[str, Any] | None = None) -> float:
    """A copy of services/rollout/rewards.py `arithmetic_exact` (this script cannot import
    loraloop; tests/unit/test_trl_peer.py checks the two agree): 1.0 iff the generation,
    cut at the first `<eos>` and stripped of `<pad>`/`<bos>`/whitespace at its ends, equals
    the ground truth exactly."""
    text = solution_str.split("<eos>", 1)[0]
    previous = None
    while text != previous:  # peel specials and whitespace off both ends, in any order
        previous = text
        text = text.strip()
        for tok in _SPECIAL_TOKENS:
            text = text.removeprefix(tok).removesuffix(tok)
    return 1.0 if text == ground_truth.strip() else 0.0


def arithmetic_prefix(data_source: str, solution_str: str, ground_truth: str,
                      extra_info: dict[str, Any] | None = None) -> float:
    """A copy of services/rollout/rewards.py `arithmetic_prefix` (the generation-heavy
    workload): 1.0 iff the generation, stripped of `<pad>`/`<bos>`/whitespace at its start,
    begins with the ground truth."""
    text = solution_str
    previous = None
    while text != previous:
        previous = text
        text = text.lstrip()
        for tok in _SPECIAL_TOKENS:
            text = text.removeprefix(tok)
    return 1.0 if text.startswith(ground_truth.strip()) else 0.0


REWARDS = {"exact": arithmetic_exact, "prefix": arithmetic_prefix}


# ------------------------------------------------------------------ arguments

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="trl_peer.py",
        description="TRL GRPOTrainer + peft LoRA on loraloop's tiny arithmetic demo; writes one JSON "
        "line per step (time, step_s, reward_mean) and a summary line (peak RSS, train time).")
    p.add_argument("--model", required=True, type=Path, help="local HF model directory (with its tokenizer)")
    p.add_argument("--prompts", required=True, type=Path,
                   help='JSONL of {"prompt": str, "ground_truth": str[, "prompt_ids": [int]]}')
    p.add_argument("--out", required=True, type=Path, help="JSONL to write, one row per step + a summary")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    p.add_argument("--prompts-per-step", type=int, default=32, help="prompt groups per step (default 32)")
    p.add_argument("--samples", type=int, default=8, help="completions per prompt (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=3, help="response length limit (default 3)")
    p.add_argument("--min-new-tokens", type=int, default=0,
                   help="suppress EOS until this many tokens (the generation-heavy workload: = max; default 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, constant (default 1e-3)")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA r (default 16)")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (default 32)")
    p.add_argument("--target-modules", default="all-linear",
                   help="all-linear, or comma-separated module names (default all-linear)")
    p.add_argument("--micro-batch", type=int, default=64,
                   help="completions per forward/backward (gradient accumulation beyond; default 64, "
                   "loraloop's micro_batch_size); capped at the step's batch")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--reward", choices=sorted(REWARDS), default="exact",
                   help="exact: loraloop's `arithmetic` (default); prefix: its `arithmetic_prefix` (long responses)")
    a = p.parse_args(argv)
    for name in ("steps", "prompts_per_step", "max_new_tokens", "lora_rank", "micro_batch", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.samples < 2:
        p.error("--samples must be >= 2 (GRPO needs a group)")
    if not 0 <= a.min_new_tokens <= a.max_new_tokens:
        p.error("--min-new-tokens must be between 0 and --max-new-tokens")
    if a.temperature <= 0:
        p.error("--temperature must be > 0")
    batch = a.prompts_per_step * a.samples
    a.micro_batch = min(a.micro_batch, batch)
    if batch % a.micro_batch:
        p.error(f"--micro-batch {a.micro_batch} must divide the step's {batch} completions")
    return a


def batch_config(prompts_per_step: int, samples: int, micro_batch: int) -> dict[str, int]:
    """GRPOConfig's batch fields for one optimizer step per `prompts_per_step x samples`
    completions, generated in one go (TRL 1.16, one process):

      per_device_train_batch_size = micro_batch    completions per forward/backward
      gradient_accumulation_steps = batch / micro  micro-steps per optimizer step
      steps_per_generation        = batch / micro  generation batch = micro x this = batch
      num_generations             = samples        group size
      num_iterations              = 1 (default)    each batch is used once

    TRL's dataloader yields `per_device_train_batch_size x steps_per_generation` rows, i.e.
    `prompts_per_step` prompts each repeated `samples` times (RepeatSampler); `_prepare_inputs`
    generates them all at once, scores them and splits them into `steps_per_generation`
    slices, one per micro-step. With steps_per_generation == gradient_accumulation_steps the
    generation is aligned with the optimizer step (no old-logprob forward), and the "dapo"
    loss divides each micro-step's token sum by the whole batch's token count, so the
    accumulated gradient is the token mean over the batch (GRPOTrainer says its loss is
    already scaled for accumulation; the Trainer does not divide it again)."""
    batch = prompts_per_step * samples
    if batch % micro_batch:
        raise ValueError(f"micro batch {micro_batch} does not divide the batch of {batch}")
    accum = batch // micro_batch
    return {"per_device_train_batch_size": micro_batch, "gradient_accumulation_steps": accum,
            "steps_per_generation": accum, "num_generations": samples}


def read_prompts(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("ground_truth"), str):
            raise ValueError(f"{path}:{n}: expected string 'prompt' and 'ground_truth'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def peak_rss_mb() -> dict[str, float]:
    """ru_maxrss (KiB on Linux) of this process and of its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(max(own, kids), 1), "self_peak_rss_mb": round(own, 1),
            "children_peak_rss_mb": round(kids, 1)}


# ------------------------------------------------------------------ the run

def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    t_start = time.monotonic()

    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    rows = read_prompts(args.prompts)
    # TRL tokenises a plain-string prompt with `processing_class(text=prompts)` (special tokens
    # added); the ids must be the ones loraloop's `render` gave, or the two sides differ.
    for row in rows:
        if "prompt_ids" in row:
            got = list(tokenizer(text=row["prompt"])["input_ids"])
            if got != list(row["prompt_ids"]):
                raise SystemExit(f"trl-peer: TRL would tokenise {row['prompt']!r} as {got}, "
                                 f"loraloop as {row['prompt_ids']}")
    dataset = Dataset.from_list([{"prompt": r["prompt"], "ground_truth": r["ground_truth"]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    targets: str | list[str] = (args.target_modules if args.target_modules == "all-linear"
                                else [m.strip() for m in args.target_modules.split(",") if m.strip()])
    lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                      target_modules=targets, task_type="CAUSAL_LM")

    step_rewards: list[float] = []

    def reward(completions: list[str], ground_truth: list[str], **_: Any) -> list[float]:
        scores = [REWARDS[args.reward]("arithmetic", c, g) for c, g in zip(completions, ground_truth, strict=True)]
        step_rewards.append(sum(scores) / len(scores))
        return scores

    reward.__name__ = "arithmetic_exact"  # TRL logs rewards/<name>/mean
    bc = batch_config(args.prompts_per_step, args.samples, args.micro_batch)
    gen_kwargs = {"min_new_tokens": args.min_new_tokens} if args.min_new_tokens else None
    out_dir = tempfile.mkdtemp(prefix="trl-peer-")  # TRL wants one; nothing is saved there
    # TRL defaults gradient checkpointing on; transformers 5.2x renamed the field to
    # activation_checkpointing (the old name still works, with a FutureWarning).
    fields = getattr(GRPOConfig, "__dataclass_fields__", {})
    no_ckpt = ({"activation_checkpointing": False} if "activation_checkpointing" in fields
               else {"gradient_checkpointing": False})
    config = GRPOConfig(
        output_dir=out_dir, max_steps=args.steps, seed=args.seed, data_seed=args.seed,
        **bc, num_iterations=1, loss_type="dapo", beta=0.0, scale_rewards="group",
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
        generation_kwargs=gen_kwargs, use_vllm=False,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch",
        bf16=False, fp16=False, **no_ckpt, use_cpu=True,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, log_completions=False,
    )

    if config.gradient_checkpointing:
        raise SystemExit("trl-peer: gradient checkpointing is still on; loraloop's demo runs without it")

    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    sink = out.open("w", encoding="utf-8")

    class Record(TrainerCallback):
        """One row per optimizer step. The step's wall time is measured between step ends
        (the first from the start of training), so it holds generation, scoring and the
        update; the row is written at on_log, which the Trainer calls right after on_step_end
        with that step's metrics (logging_steps=1)."""

        def __init__(self) -> None:
            self.t0 = 0.0
            self.last = 0.0
            self.pending: dict[str, Any] | None = None
            self.rows: list[dict[str, Any]] = []

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self.t0 = self.last = time.monotonic()

        def on_step_end(self, a: Any, state: Any, *rest: Any, **k: Any) -> None:
            now = time.monotonic()
            self.pending = {"step": state.global_step, "time": round(now - self.t0, 4),
                            "step_s": round(now - self.last, 4)}
            self.last = now

        def on_log(self, a: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **k: Any) -> None:
            if self.pending is None or not logs or "reward" not in logs:
                return  # e.g. the final train-summary log
            row = {**self.pending, "reward_mean": logs["reward"],
                   "own_reward_mean": step_rewards[-1] if step_rewards else None,
                   "completion_len_mean": logs.get("completions/mean_length"),
                   "loss": logs.get("loss"), "grad_norm": logs.get("grad_norm")}
            self.pending = None
            self.rows.append(row)
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            print(f"trl-peer step {row['step']}/{args.steps} time {row['time']:.2f} s "
                  f"step_s {row['step_s']:.3f} reward {row['reward_mean']:.3f}", flush=True)

    rec = Record()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora, callbacks=[rec])
    setup_s = time.monotonic() - t_start
    trainer.train()
    train_s = rec.last - rec.t0
    summary = {"summary": True, "steps": len(rec.rows), "train_s": round(train_s, 3),
               "setup_s": round(setup_s, 3), **peak_rss_mb(), "threads": args.threads,
               "batch": args.prompts_per_step * args.samples, **bc,
               "versions": {m.__name__: m.__version__ for m in (torch, sys.modules["transformers"],
                                                                 sys.modules["peft"], sys.modules["trl"])},
               "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    sink.write(json.dumps(summary) + "\n")
    sink.close()
    shutil.rmtree(out_dir, ignore_errors=True)
    print(f"trl-peer done: {summary['steps']} steps in {train_s:.1f} s, peak RSS {summary['peak_rss_mb']:.0f} MB",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
