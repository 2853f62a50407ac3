"""Warm-start the tiny model on the arithmetic task, just enough for RL signal to appear.

From random weights every sampled answer is wrong, every group's rewards are equal, and
GRPO has no gradient. A brief supervised warm start fixes that: full fine-tuning, AdamW
lr 3e-3, batch 128, loss on the answer tokens only, stopped as soon as sampled (T=1) exact
match reaches `target` (0.15 by default: ~20-25 steps, about a second; see
shared/measurements.md). Stopping that early leaves most of the learning to RL.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)
VOCAB = {c: i + 3 for i, c in enumerate("0123456789+=")}
BOS, EOS = 1, 2


def _problems() -> list[tuple[list[int], list[int]]]:
    out = []
    for a in range(10):
        for b in range(10):
            prompt = [BOS] + [VOCAB[c] for c in f"{a}+{b}="]
            answer = [VOCAB[c] for c in f"{a + b:02d}"] + [EOS]
            out.append((prompt, answer))
    return out


@torch.no_grad()
def sampled_exact_match(model, problems, samples: int = 4, generator: torch.Generator | None = None) -> float:
    """Share of sampled (T=1) answers that are exactly right, over `samples` per problem."""
    prompts = torch.tensor([p for p, _ in problems for _ in range(samples)])
    answers = [a for _, a in problems for _ in range(samples)]
    ids = prompts
    for _ in range(3):
        logits = model(input_ids=ids).logits[:, -1].float()
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        ids = torch.cat([ids, nxt], 1)
    got = ids[:, prompts.shape[1]:].tolist()
    return sum(g == a for g, a in zip(got, answers, strict=True)) / len(answers)


def warm_start(model_dir: str | Path, target: float = 0.15, seed: int = 0, max_steps: int = 300,
               batch: int = 128, lr: float = 3e-3) -> dict:
    """Fine-tune `model_dir` in place until sampled exact match >= target; returns a summary."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    problems = _problems()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    seqs = torch.tensor([p + a for p, a in problems])
    labels = seqs.clone()
    labels[:, : len(problems[0][0])] = -100  # loss on the answer only
    match, step = sampled_exact_match(model, problems, generator=gen), 0
    while match < target and step < max_steps:
        model.train()
        idx = torch.randint(0, len(problems), (batch,), generator=gen)
        loss = model(input_ids=seqs[idx], labels=labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        model.eval()
        match = sampled_exact_match(model, problems, generator=gen)
    model.save_pretrained(model_dir, safe_serialization=True)
    summary = {"steps": step, "sampled_exact_match": match, "target": target, "seed": seed}
    log.info("warm start: %d steps, sampled exact match %.3f", step, match)
    return summary
