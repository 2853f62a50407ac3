"""Reward functions for tests, importable by a rollout server started from the repository root
(`--data.reward_fn=tests.support.rewards:text_hash`)."""

from __future__ import annotations

import hashlib


def text_hash(data_source: str, solution_str: str, ground_truth: str, extra_info=None) -> float:
    """A score in [0, 1) that depends on the whole response text and nothing else: equal means
    over a prompt set show that two runs produced the same texts."""
    return int(hashlib.sha256(solution_str.encode()).hexdigest()[:8], 16) / 2**32
