"""`loraloop bench update`: the learner's update on the demo batch against a plain PyTorch loop.

Both sides do the same update, in one process, on the same thread count, in alternating
rounds (medians reported):
  (a) ours: `Policy` + `Trainer.step` with the demo's learner settings (GRPO advantages,
      token-mean loss, no KL, one micro-batch of the whole batch, AdamW lr 1e-3, gradient
      clipping), on a batch shaped like the demo's (32 prompts x 8 samples, 5 prompt + 3
      response tokens);
  (b) plain: what a single-process script writes by hand -- peft `get_peft_model` on the same
      base (r=16, alpha 32, all linear layers), one forward, log-softmax and gather, the GRPO
      advantage (reward minus group mean over group std), loss -(A * ratio) token-mean with
      ratio = exp(lp - lp.detach()), backward, `clip_grad_norm_`, AdamW step.
The model is the demo's tiny shape (the warm start changes no cost). Goal (issue 17): ours
<= 1.2x plain per update.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from services.bench import emit

GOAL_RATIO = 1.2


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="loraloop bench update",
        description="The learner's update (Policy + Trainer, the demo's settings) against a plain PyTorch + peft "
                    "loop doing the same update on the same batch and thread count, alternating, in one process.")
    p.add_argument("--out", type=Path, help="write every figure to this JSON file")
    p.add_argument("--rounds", type=int, default=30, help="timed updates per side (after 3 untimed each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the demo's learner runs 1)")
    p.add_argument("--shape", default="tiny", choices=["tiny", "25m"], help="model shape")
    p.add_argument("--quick", action="store_true", help="5 rounds")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds = 5
    if a.rounds < 1 or a.threads < 1:
        p.error("--rounds and --threads must be >= 1")
    return a


def demo_batch(groups: int = 32, samples: int = 8, prompt: int = 5, response: int = 3, seed: int = 0):
    """A batch shaped like the demo's (bench learner's synthetic batch, groups of `samples`)."""
    from services.bench.learner import Workload, synthetic_batch

    seqs = groups * samples
    return synthetic_batch(Workload(seqs=seqs, tokens=prompt + response, prompt=prompt, micro_batch=seqs),
                           seed=seed, group_size=samples)


class PlainLoop:
    """(b): a hand-written peft + torch update."""

    def __init__(self, model_dir: Path, lr: float, grad_clip: float, group: int) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                     lora_dropout=0.0, task_type="CAUSAL_LM"))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr)
        self.grad_clip, self.group = grad_clip, group

    def step(self, b) -> float:
        import torch

        self.model.train()
        ids, att, mask = b.input_ids, b.attention_mask, b.response_mask
        logits = self.model(input_ids=ids, attention_mask=att, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        lp = torch.gather(logp, -1, ids[:, 1:, None]).squeeze(-1)
        m = mask[:, 1:].float()
        r = b.rewards.float().view(-1, self.group)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1, 1)
        loss = -(torch.exp(lp - lp.detach()) * adv * m).sum() / m.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def run(args: argparse.Namespace, workdir: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from services.common.tiny_model import make_tiny_model
    from services.learner.config import ModelConfig
    from services.learner.policy import Policy
    from services.learner.trainer import Trainer
    from services.stack_config import DEMO_LEARNER

    model_dir = make_tiny_model(workdir / args.shape, seed=0, shape=args.shape)
    d = DEMO_LEARNER.data
    batch = demo_batch(d.groups_per_step, d.samples_per_group, response=d.max_tokens)
    algo = DEMO_LEARNER.algo
    policy = Policy(ModelConfig(path=str(model_dir), lora_rank=16, lora_alpha=32.0, target_modules="all-linear"))
    trainer = Trainer(policy, algo)
    plain = PlainLoop(model_dir, algo.lr, algo.grad_clip, DEMO_LEARNER.data.samples_per_group)
    sides = {"ours": lambda: trainer.step(batch), "plain": lambda: plain.step(batch)}
    times: dict[str, list[float]] = {k: [] for k in sides}
    for i in range(3 + args.rounds):
        order = list(sides) if i % 2 == 0 else list(reversed(sides))  # neither always goes first
        for k in order:
            t = time.perf_counter()
            sides[k]()
            if i >= 3:
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "benchmark": "update", "shape": args.shape, "threads": torch.get_num_threads(),
        "batch": {"rows": batch.size, "tokens_per_row": int(batch.input_ids.shape[1]),
                  "response_tokens": int(batch.response_mask.sum())},
        "algo": {"advantage": algo.advantage, "loss_agg": algo.loss_agg, "kl_coef": algo.kl_coef, "lr": algo.lr,
                 "micro_batch_size": algo.micro_batch_size, "grad_clip": algo.grad_clip},
        "rounds": args.rounds, "s": times, "median_s": med, "ratio": med["ours"] / med["plain"],
        "goal": GOAL_RATIO, "met": med["ours"] / med["plain"] <= GOAL_RATIO,
    }


def report(r: dict) -> str:
    b = r["batch"]
    return "\n".join([
        f"loraloop bench update: {r['shape']} model, {r['threads']} torch thread(s), batch {b['rows']} rows x "
        f"{b['tokens_per_row']} tokens, {r['rounds']} alternating rounds",
        f"  ours (Policy + Trainer.step, demo settings)  {1e3 * r['median_s']['ours']:7.1f} ms per update (median)",
        f"  plain peft + torch loop, same update          {1e3 * r['median_s']['plain']:7.1f} ms",
        f"  ratio {r['ratio']:.2f}x (goal <= {r['goal']:g}x: {'met' if r['met'] else 'MISSED'})",
    ])


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loraloop-bench-update-") as d:
        result = run(args, Path(d))
    emit(report(result), result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(os.sys.argv[1:]))
