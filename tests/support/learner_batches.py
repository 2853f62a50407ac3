"""Synthetic but realistic training batches for learner tests (arithmetic prompts)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

VOCAB = {c: i + 3 for i, c in enumerate("0123456789+=")}


@dataclass
class S:
    response_token_ids: list[int]
    logprobs: list[float]
    reward: float
    adapter_version: int = 1


@dataclass
class G:
    prompt_token_ids: list[int]
    samples: list[S] = field(default_factory=list)


def synthetic_groups(num_groups: int = 8, n: int = 4, seed: int = 0, resp_len: int = 3) -> list[G]:
    g = torch.Generator().manual_seed(seed)
    groups = []
    for k in range(num_groups):
        a, b = k % 10, (3 * k + 1) % 10
        prompt = [1] + [VOCAB[c] for c in f"{a}+{b}="]
        samples = []
        for j in range(n):
            length = resp_len - (j % 2)  # uneven lengths exercise the masks
            ids = [*torch.randint(3, 13, (length,), generator=g).tolist(), 2]
            lps = (-torch.rand(len(ids), generator=g) * 3).tolist()
            reward = float((j + k) % 3 == 0)
            samples.append(S(ids, lps, reward))
        groups.append(G(prompt, samples))
    return groups
