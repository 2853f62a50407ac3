"""Loss aggregation and registries: verl's four modes by hand and against a loop, unknown
names, and the micro-batch invariance the trainer relies on: with global normalisers the
per-micro-batch losses (and gradients) sum to the full-batch ones."""

from __future__ import annotations

import math

import pytest
import torch

from services.learner.algorithms import (
    ADVANTAGE_ESTIMATORS,
    AGG_MODES,
    KL_ESTIMATORS,
    LossInputs,
    UnknownName,
    get_advantage_fn,
    loss_agg,
    policy_loss,
)

MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def test_registries_hold_the_documented_names() -> None:
    assert set(AGG_MODES.names()) == set(MODES)
    assert KL_ESTIMATORS.names() == ("abs", "abs+", "k1", "k1+", "k2", "k3", "k3+")
    assert ADVANTAGE_ESTIMATORS.names() == (
        "dr_grpo",
        "gae",
        "grpo",
        "reinforce_plus_plus",
        "reinforce_plus_plus_baseline",
        "rloo",
    )


@pytest.mark.parametrize(
    ("lookup", "valid"),
    [
        (lambda: get_advantage_fn("ppo"), "dr_grpo, gae, grpo"),
        (lambda: loss_agg(torch.zeros(1, 1), torch.ones(1, 1), "mean"), "seq-mean-token-mean"),
        (lambda: KL_ESTIMATORS.get("low_var_kl"), r"k1, k1\+, k2, k3, k3\+"),
    ],
)
def test_unknown_name_lists_the_valid_ones(lookup, valid: str) -> None:
    with pytest.raises(UnknownName, match=valid):
        lookup()


def test_an_estimator_refuses_a_keyword_it_does_not_use() -> None:
    from services.learner.algorithms import AdvantageInputs

    inputs = AdvantageInputs(torch.zeros(2), torch.ones(2, 1), group_ids=torch.tensor([0, 0]))
    with pytest.raises(TypeError, match="lam"):
        get_advantage_fn("grpo")(inputs, lam=0.95)


# Row 0 has 3 tokens (1, 2, 3), row 1 one token (4); the nan sits on padding and must not leak.
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, math.nan, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    ("mode", "kwargs", "expected"),
    [
        ("token-mean", {}, 2.5),  # (1+2+3+4) / 4 tokens
        ("token-mean", {"global_tokens": 8}, 1.25),  # 10 / 8
        ("token-sum", {}, 10.0),  # 1+2+3+4, no normaliser
        ("token-sum", {"global_tokens": 8, "global_seqs": 4}, 10.0),  # normalisers do not apply
        ("seq-mean-token-sum", {}, 5.0),  # (6 + 4) / 2 seqs
        ("seq-mean-token-sum", {"global_seqs": 5}, 2.0),  # 10 / 5
        ("seq-mean-token-mean", {}, 3.0),  # (6/3 + 4/1) / 2
        ("seq-mean-token-mean", {"global_seqs": 4}, 1.5),  # (2 + 4) / 4
        ("seq-mean-token-sum-norm", {}, 10 / 6),  # (6 + 4) / (2 seqs * T=3)
        ("seq-mean-token-sum-norm", {"max_len": 5}, 1.0),  # 10 / (2 * 5)
        ("seq-mean-token-sum-norm", {"global_seqs": 4, "max_len": 5}, 0.5),  # 10 / (4 * 5)
    ],
)
def test_aggregation_by_hand(mode: str, kwargs: dict, expected: float) -> None:
    assert loss_agg(LOSS, MASK, mode, **kwargs).item() == pytest.approx(expected, abs=1e-6)


def _agg_loop(loss: torch.Tensor, mask: torch.Tensor, mode: str) -> float:
    rows = [
        [float(x) for x, m in zip(lr, mr, strict=True) if m]
        for lr, mr in zip(loss.tolist(), mask.tolist(), strict=True)
    ]
    if mode == "token-mean":
        return sum(map(sum, rows)) / max(sum(map(len, rows)), 1)
    if mode == "token-sum":
        return sum(map(sum, rows))
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / len(rows)
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) if r else 0.0 for r in rows) / len(rows)
    return sum(sum(r) for r in rows) / (len(rows) * loss.shape[1])


@pytest.mark.parametrize("mode", MODES)
def test_aggregation_matches_a_loop(mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(7, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(7, 9, generator=g) < 0.6
    mask[3] = False  # an empty sequence counts as a sequence with loss 0
    assert loss_agg(loss, mask, mode).item() == pytest.approx(
        _agg_loop(loss, mask, mode), abs=1e-10
    )


def test_sum_norm_with_global_seqs_needs_a_constant_length() -> None:
    with pytest.raises(ValueError, match="max_len"):
        loss_agg(LOSS, MASK, "seq-mean-token-sum-norm", global_seqs=4)


def test_aggregation_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        loss_agg(torch.zeros(2, 3), torch.ones(2, 4))


# --- micro-batch invariance ------------------------------------------------------------

B, T = 6, 7
LENGTHS = [7, 3, 0, 5, 1, 6]  # includes an empty response
SPLITS = [(0, 2), (2, 3), (3, 6)]  # uneven micro-batches


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    old = -torch.rand(B, T, generator=g) * 3
    return {
        "mask": mask,
        "logprobs": old + 0.3 * torch.randn(B, T, generator=g),  # some ratios clip
        "old": old,
        "behaviour": old + 0.5 * torch.randn(B, T, generator=g),  # some TIS weights hit the cap
        "ref": old + 0.2 * torch.randn(B, T, generator=g),
        "entropy": torch.rand(B, T, generator=g) * 2,
        "adv": torch.randn(B, T, generator=g),
    }


def _loss(d: dict[str, torch.Tensor], lp: torch.Tensor, rows: slice, cols: int, **kw):
    inputs = LossInputs(
        logprobs=lp[rows, :cols],
        old_logprobs=d["old"][rows, :cols],
        behaviour_logprobs=d["behaviour"][rows, :cols],
        advantages=d["adv"][rows, :cols],
        response_mask=d["mask"][rows, :cols],
        ref_logprobs=d["ref"][rows, :cols],
        entropy=d["entropy"][rows, :cols],
    )
    return policy_loss(inputs, clip_high=0.28, kl_coef=0.1, entropy_coef=0.01, **kw).loss


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_sum_to_the_full_batch_loss_and_gradient(mode: str) -> None:
    d = _batch()
    norm = {"global_tokens": int(d["mask"].sum()), "global_seqs": B, "max_len": T}

    full_lp = d["logprobs"].clone().requires_grad_()
    full = _loss(d, full_lp, slice(None), T, agg=mode, **norm)
    full.backward()

    micro_lp = d["logprobs"].clone().requires_grad_()
    total = torch.zeros(())
    for start, stop in SPLITS:
        # Each micro-batch is trimmed to its own longest response, as a packer would.
        cols = max(max(LENGTHS[start:stop]), 1)
        micro = _loss(d, micro_lp, slice(start, stop), cols, agg=mode, **norm)
        micro.backward()
        total = total + micro.detach()

    assert full.item() != 0.0
    torch.testing.assert_close(total, full.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(micro_lp.grad, full_lp.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", [m for m in MODES if m != "token-sum"])  # token-sum has no normaliser
def test_local_normalisers_do_not_sum_to_the_full_batch_loss(mode: str) -> None:
    # The counter-check that makes the test above meaningful: without the global
    # normalisers each micro-batch divides by its own count and the sum is off.
    d = _batch()
    lp = d["logprobs"]
    full = _loss(d, lp, slice(None), T, agg=mode)
    parts = [_loss(d, lp, slice(a, b), max(max(LENGTHS[a:b]), 1), agg=mode) for a, b in SPLITS]
    assert abs(sum(p.item() for p in parts) - full.item()) > 1e-3
