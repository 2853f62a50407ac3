"""Advantage estimators: hand-worked values, a plain-loop reference for each vectorised
estimator, and invariances (reward shift/scale, sample order, group labels)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

import pytest
import torch

from services.learner.algorithms import (
    AdvantageInputs,
    discounted_returns,
    dr_grpo_advantages,
    gae_advantages,
    get_advantage_fn,
    grpo_advantages,
    masked_whiten,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    token_rewards,
)

# Seven samples in three interleaved groups: 7 -> rewards (1, 0, 0, 1), 9 -> (2, 4), 5 -> (3).
GROUPS = torch.tensor([7, 7, 9, 7, 9, 7, 5])
REWARDS = torch.tensor([1.0, 0.0, 2.0, 0.0, 4.0, 1.0, 3.0])
LENGTHS = torch.tensor([3, 1, 2, 3, 2, 1, 2])
MASK = torch.arange(3)[None, :] < LENGTHS[:, None]
EPS = 1e-6


def _outcome(name: str, **kw) -> torch.Tensor:
    out = get_advantage_fn(name)(AdvantageInputs(REWARDS, MASK, group_ids=GROUPS), **kw)
    # Outcome estimators put one value on every response token and 0 on padding.
    assert torch.equal(out.advantages, torch.where(MASK, out.advantages[:, :1], 0))
    return out.advantages[:, 0]


def test_grpo_by_hand() -> None:
    # group 7: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3); A = +-0.5 / (sqrt(1/3) + eps)
    a7 = 0.5 / (math.sqrt(1 / 3) + EPS)
    # group 9: mean 3, std sqrt((1 + 1) / 1) = sqrt(2); A = -+1 / (sqrt(2) + eps)
    a9 = 1 / (math.sqrt(2) + EPS)
    # group 5 has one sample: no relative signal, A = 0
    expected = torch.tensor([a7, -a7, -a9, -a7, a9, a7, 0.0])
    torch.testing.assert_close(_outcome("grpo"), expected, rtol=0, atol=1e-6)


def test_dr_grpo_by_hand() -> None:
    # r - group mean: group 7 -> +-0.5, group 9 -> 2-3, 4-3, singleton -> 0
    expected = torch.tensor([0.5, -0.5, -1.0, -0.5, 1.0, 0.5, 0.0])
    assert torch.equal(_outcome("dr_grpo"), expected)
    assert torch.equal(_outcome("grpo", norm_by_std=False), expected)


def test_rloo_by_hand() -> None:
    # r_i - mean of the others: 1 - (0+0+1)/3 = 2/3, 0 - (1+0+1)/3 = -2/3; 2 - 4, 4 - 2; singleton 0
    expected = torch.tensor([2 / 3, -2 / 3, -2.0, -2 / 3, 2.0, 2 / 3, 0.0])
    torch.testing.assert_close(_outcome("rloo"), expected, rtol=0, atol=1e-6)


def test_token_penalty_is_subtracted_from_the_outcome_reward() -> None:
    # Both rewards 1; sample 0 pays 0.5 + 0.5 on its two tokens (the 9 is padding):
    # returns (0, 1), Dr. GRPO advantages (-0.5, +0.5).
    penalty = torch.tensor([[0.5, 0.5, 9.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    inputs = AdvantageInputs(torch.ones(2), mask, torch.tensor([0, 0]), token_penalty=penalty)
    assert dr_grpo_advantages(inputs).advantages[:, 0].tolist() == [-0.5, 0.5]


def _group_loop(rewards: list[float], groups: list[int], kind: str) -> list[float]:
    members: dict[int, list[float]] = defaultdict(list)
    for r, g in zip(rewards, groups, strict=True):
        members[g].append(r)
    out = []
    for r, g in zip(rewards, groups, strict=True):
        rs = members[g]
        if len(rs) == 1:
            out.append(0.0)
        elif kind == "grpo":
            out.append((r - statistics.fmean(rs)) / (statistics.stdev(rs) + EPS))
        elif kind == "dr_grpo":
            out.append(r - statistics.fmean(rs))
        else:  # rloo
            out.append(r - (sum(rs) - r) / (len(rs) - 1))
    return out


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_match_a_loop(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 9, (40,), generator=g) * 1000 + 17  # sparse, unsorted ids
    rewards = torch.randn(40, generator=g, dtype=torch.float64)
    mask = torch.ones(40, 4, dtype=torch.bool)
    adv = get_advantage_fn(kind)(AdvantageInputs(rewards, mask, group_ids=groups)).advantages
    expected = _group_loop(rewards.tolist(), groups.tolist(), kind)
    torch.testing.assert_close(
        adv[:, 0], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-10
    )


def test_grpo_is_invariant_to_reward_shift_and_scale_and_dr_grpo_to_shift() -> None:
    base = _outcome("grpo")
    moved = grpo_advantages(AdvantageInputs(3 * REWARDS + 5, MASK, GROUPS)).advantages[:, 0]
    torch.testing.assert_close(moved, base, rtol=0, atol=1e-5)
    shifted = dr_grpo_advantages(AdvantageInputs(REWARDS - 2, MASK, GROUPS)).advantages[:, 0]
    torch.testing.assert_close(shifted, _outcome("dr_grpo"), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["grpo", "rloo", "reinforce_plus_plus_baseline"])
def test_group_estimators_ignore_sample_order_and_group_labels(kind: str) -> None:
    base = get_advantage_fn(kind)(AdvantageInputs(REWARDS, MASK, GROUPS)).advantages
    perm = torch.tensor([6, 2, 0, 5, 1, 4, 3])
    relabelled = GROUPS[perm] * -3 + 100  # a different id per group, same partition
    out = get_advantage_fn(kind)(AdvantageInputs(REWARDS[perm], MASK[perm], relabelled))
    torch.testing.assert_close(out.advantages, base[perm], rtol=0, atol=1e-6)


def test_rloo_is_dr_grpo_scaled_by_n_over_n_minus_1() -> None:
    # Groups of 4: RLOO = 4/3 * (r - mean).
    g = torch.Generator().manual_seed(2)
    inputs = AdvantageInputs(torch.rand(12, generator=g), torch.ones(12, 2), torch.arange(12) // 4)
    torch.testing.assert_close(
        rloo_advantages(inputs).advantages,
        4 / 3 * dr_grpo_advantages(inputs).advantages,
        rtol=0,
        atol=1e-6,
    )


def test_group_estimators_need_group_ids() -> None:
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(AdvantageInputs(REWARDS, MASK))


def test_token_rewards_put_the_outcome_on_the_last_response_token() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 0]])
    out = token_rewards(torch.tensor([2.0, 3.0, 4.0]), mask, torch.full((3, 3), 0.25))
    # row 0: last token at 1; row 1: at 2 (the hole at 1 pays nothing); row 2 has no token
    assert out.tolist() == [[-0.25, 1.75, 0.0], [-0.25, 0.0, 2.75], [0.0, 0.0, 0.0]]


def test_reinforce_pp_by_hand() -> None:
    # gamma 0.5; rewards 1 (3 tokens) and -1 (2 tokens) on the last tokens.
    # returns: row 0 (0.25, 0.5, 1), row 1 (-0.5, -1, pad)
    # whiten over 5 tokens: mean 0.25/5 = 0.05; deviations 0.2 0.45 0.95 -0.55 -1.05;
    # squares sum 0.04+0.2025+0.9025+0.3025+1.1025 = 2.55; unbiased var 2.55/4 = 0.6375
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = reinforce_pp_advantages(AdvantageInputs(torch.tensor([1.0, -1.0]), mask), gamma=0.5)
    assert out.returns.tolist() == [[0.25, 0.5, 1.0], [-0.5, -1.0, 0.0]]
    std = math.sqrt(0.6375 + 1e-8)
    expected = torch.tensor([[0.2, 0.45, 0.95], [-0.55, -1.05, 0.0]]) / std
    torch.testing.assert_close(out.advantages, expected, rtol=0, atol=1e-6)


def test_discount_skips_positions_outside_the_mask() -> None:
    # mask (1, 0, 1), reward 1 on position 2, gamma 0.5: G2 = 1, G1 skipped, G0 = 0.5 * 1
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    assert discounted_returns(rewards, torch.tensor([[1, 0, 1]]), 0.5).tolist() == [[0.5, 0.0, 1.0]]


def test_reinforce_pp_baseline_by_hand() -> None:
    # Groups 4: (1, 3) and 8: (10, 12), one token each. Centred by group mean: (-1, 1, -1, 1);
    # whitened with mean 0 and unbiased var (1+1+1+1) / 3 = 4/3: -+1 / sqrt(4/3).
    # (Without the baseline the whitened rewards would be far apart: (1, 3) vs (10, 12).)
    inputs = AdvantageInputs(
        torch.tensor([1.0, 3.0, 10.0, 12.0]), torch.ones(4, 1), torch.tensor([4, 4, 8, 8])
    )
    out = reinforce_pp_baseline_advantages(inputs)
    expected = torch.tensor([[-1.0], [1.0], [-1.0], [1.0]]) / math.sqrt(4 / 3 + 1e-8)
    torch.testing.assert_close(out.advantages, expected, rtol=0, atol=1e-6)


def test_gae_by_hand() -> None:
    # reward 1 at t=2, V = (0.5, 0.6, 0.7), gamma 0.9, lam 0.8 (gamma*lam = 0.72):
    # t2: delta = 1 - 0.7 = 0.3                    A2 = 0.3
    # t1: delta = 0.9*0.7 - 0.6 = 0.03              A1 = 0.03 + 0.72*0.3 = 0.246
    # t0: delta = 0.9*0.6 - 0.5 = 0.04              A0 = 0.04 + 0.72*0.246 = 0.21712
    # returns = A + V = (0.71712, 0.846, 1.0)
    inputs = AdvantageInputs(
        torch.tensor([1.0]), torch.ones(1, 3), values=torch.tensor([[0.5, 0.6, 0.7]])
    )
    out = gae_advantages(inputs, gamma=0.9, lam=0.8, whiten=False)
    torch.testing.assert_close(
        out.advantages, torch.tensor([[0.21712, 0.246, 0.3]]), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        out.returns, torch.tensor([[0.71712, 0.846, 1.0]]), rtol=0, atol=1e-6
    )


def _random_token_batch(seed: int, b: int = 9, t: int = 8):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=g) < 0.75  # holes as well as padding
    mask[2] = False
    rewards = torch.randn(b, generator=g, dtype=torch.float64)
    penalty = 0.1 * torch.rand(b, t, generator=g, dtype=torch.float64)
    values = torch.randn(b, t, generator=g, dtype=torch.float64)
    values[~mask] = math.nan  # padded critic outputs must not leak
    return rewards, mask, penalty, values


def _returns_loop(
    reward: float, penalty: list[float], mask: list[bool], gamma: float
) -> list[float]:
    idx = [i for i, m in enumerate(mask) if m]
    r = {i: -penalty[i] for i in idx}
    if idx:
        r[idx[-1]] += reward
    out, running = [0.0] * len(mask), 0.0
    for i in reversed(idx):
        running = r[i] + gamma * running
        out[i] = running
    return out


def _whiten_loop(x: list[list[float]], mask: list[list[bool]]) -> list[list[float]]:
    flat = [v for row, mr in zip(x, mask, strict=True) for v, m in zip(row, mr, strict=True) if m]
    mean, var = statistics.fmean(flat), statistics.variance(flat)
    return [
        [(v - mean) / math.sqrt(var + 1e-8) if m else 0.0 for v, m in zip(row, mr, strict=True)]
        for row, mr in zip(x, mask, strict=True)
    ]


def test_reinforce_pp_matches_a_loop() -> None:
    rewards, mask, penalty, _ = _random_token_batch(3)
    out = reinforce_pp_advantages(AdvantageInputs(rewards, mask, token_penalty=penalty), gamma=0.9)
    rets = [
        _returns_loop(r, p, m, 0.9)
        for r, p, m in zip(rewards.tolist(), penalty.tolist(), mask.tolist(), strict=True)
    ]
    f64 = torch.float64
    torch.testing.assert_close(out.returns, torch.tensor(rets, dtype=f64), rtol=0, atol=1e-10)
    whitened = torch.tensor(_whiten_loop(rets, mask.tolist()), dtype=f64)
    torch.testing.assert_close(out.advantages, whitened, rtol=0, atol=1e-10)
    torch.testing.assert_close(masked_whiten(out.returns, mask), whitened, rtol=0, atol=1e-10)


def _gae_loop(reward, penalty, values, mask, gamma, lam) -> tuple[list[float], list[float]]:
    idx = [i for i, m in enumerate(mask) if m]
    r = {i: -penalty[i] for i in idx}
    if idx:
        r[idx[-1]] += reward
    adv, ret = [0.0] * len(mask), [0.0] * len(mask)
    next_v, gae = 0.0, 0.0
    for i in reversed(idx):
        gae = r[i] + gamma * next_v - values[i] + gamma * lam * gae
        adv[i], ret[i], next_v = gae, gae + values[i], values[i]
    return adv, ret


def test_gae_matches_a_loop() -> None:
    rewards, mask, penalty, values = _random_token_batch(4)
    inputs = AdvantageInputs(rewards, mask, values=values, token_penalty=penalty)
    out = gae_advantages(inputs, gamma=0.95, lam=0.9, whiten=False)
    rows = [
        _gae_loop(*args, 0.95, 0.9)
        for args in zip(
            rewards.tolist(), penalty.tolist(), values.tolist(), mask.tolist(), strict=True
        )
    ]
    f64 = torch.float64
    adv = torch.tensor([a for a, _ in rows], dtype=f64)
    torch.testing.assert_close(out.advantages, adv, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        out.returns, torch.tensor([r for _, r in rows], dtype=f64), rtol=0, atol=1e-10
    )
    whitened = gae_advantages(inputs, gamma=0.95, lam=0.9).advantages
    expected = torch.tensor(_whiten_loop(adv.tolist(), mask.tolist()), dtype=f64)
    torch.testing.assert_close(whitened, expected, rtol=0, atol=1e-10)


def test_gae_with_lambda_one_returns_monte_carlo_returns_whatever_the_critic() -> None:
    # lam = 1 telescopes the TD errors: A_t + V_t = G_t, independent of V.
    rewards, mask, penalty, values = _random_token_batch(5)
    inputs = AdvantageInputs(rewards, mask, values=values, token_penalty=penalty)
    out = gae_advantages(inputs, gamma=0.9, lam=1.0)
    mc = discounted_returns(token_rewards(rewards, mask, penalty), mask, 0.9)
    torch.testing.assert_close(out.returns, mc, rtol=0, atol=1e-10)


def test_gae_needs_values() -> None:
    with pytest.raises(ValueError, match="values"):
        gae_advantages(AdvantageInputs(REWARDS, MASK))


def test_advantages_carry_no_gradient() -> None:
    values = torch.randn(7, 3, requires_grad=True)
    out = gae_advantages(AdvantageInputs(REWARDS, MASK, values=values))
    assert not out.advantages.requires_grad and not out.returns.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rewards": torch.zeros(2, 1), "response_mask": torch.ones(2, 3)}, "rewards"),
        ({"rewards": torch.zeros(2), "response_mask": torch.ones(3, 3)}, "response_mask"),
        (
            {
                "rewards": torch.zeros(2),
                "response_mask": torch.ones(2, 3),
                "group_ids": torch.zeros(2),
            },
            "group_ids",
        ),
        (
            {
                "rewards": torch.zeros(2),
                "response_mask": torch.ones(2, 3),
                "values": torch.ones(2, 2),
            },
            "values",
        ),
    ],
)
def test_inputs_are_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AdvantageInputs(**kwargs)
