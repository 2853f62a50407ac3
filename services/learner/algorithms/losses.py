"""Policy and value losses over [B, T] token tensors.

Three policies meet in the policy loss: the learner now (`logprobs`, with gradient), the
learner when this step's batch was taken (`old_logprobs`, the proximal policy PPO clips
around) and the rollout engine that sampled the tokens (`behaviour_logprobs`, from vLLM,
possibly several adapter versions old). PPO's ratio is taken against the learner's own
old log-probs; the gap to the behaviour policy - staleness plus vLLM/trainer numerics - is
corrected with a truncated importance weight (TIS, Yao et al. 2025).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .aggregation import AggMode, Normaliser, loss_agg, masked_mean
from .registry import Registry

KlType = Literal["k1", "k2", "k3", "abs", "k1+", "k3+", "abs+"]
KL_ESTIMATORS: Registry[Callable[[Tensor], Tensor]] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def _k1(log_ratio: Tensor) -> Tensor:
    return log_ratio


@KL_ESTIMATORS.register("k2")
def _k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio**2


@KL_ESTIMATORS.register("k3")
def _k3(log_ratio: Tensor) -> Tensor:
    # As verl's low_var_kl: the log-ratio is clamped to [-20, 20] before exp, and the value to
    # [-10, 10]. Clamping only the value left exp(-x) = inf once x < -88, and the gradient
    # through the clamp then 0 * inf = NaN; clamped first, that token's gradient is 0.
    x = (-log_ratio).clamp(-20.0, 20.0)
    return (torch.exp(x) - x - 1).clamp(-10.0, 10.0)


@KL_ESTIMATORS.register("abs")
def _abs(log_ratio: Tensor) -> Tensor:
    return log_ratio.abs()


def _straight_through(forward: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """verl's `+` estimators: the value of `forward`, the gradient of k2 (x^2 / 2). k1 and k3
    are unbiased for the KL's value but their expected gradient is not the KL's gradient; k2's
    is (Schulman 2020)."""
    def fn(log_ratio: Tensor) -> Tensor:
        back = _k2(log_ratio)
        return back - back.detach() + forward(log_ratio).detach()
    return fn


for _name, _fwd in (("k1+", _k1), ("k3+", _k3), ("abs+", _abs)):
    KL_ESTIMATORS.register(_name)(_straight_through(_fwd))


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kl_type: KlType | str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020,
    "Approximating KL Divergence"). With x = log pi - log pi_ref:
    k1 = x (unbiased, high variance, can be negative); k2 = x^2 / 2 (biased, low variance);
    k3 = exp(-x) - 1 + x (unbiased, low variance, >= 0; verl's "low_var_kl"), x clamped to
    [-20, 20] and the value to [-10, 10] as verl does; abs = |x|. `k1+`, `k3+`, `abs+`: that
    value with k2's gradient (verl's straight-through variants).
    """
    return KL_ESTIMATORS.get(kl_type)(logprobs - ref_logprobs)


def kl_reward_penalty(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    *,
    kl_coef: float,
    kl_type: KlType | str = "k1",
) -> Tensor:
    """KL in the reward (Ouyang et al. 2022; REINFORCE++): kl_coef * KL estimate per token,
    detached and zero outside the mask, for `AdvantageInputs.token_penalty`. Pass the
    log-probs the samples were scored with (the learner's old ones), not live ones."""
    kl = kl_estimate(logprobs.detach(), ref_logprobs.detach(), kl_type)
    return torch.where(response_mask.bool(), kl_coef * kl, 0)


@dataclass(frozen=True)
class LossInputs:
    """Token-level inputs of `policy_loss`, each [B, T].

    Attributes:
        logprobs: the learner's log-probs of the sampled tokens, with gradient.
        old_logprobs: the learner's log-probs before this step's updates (no gradient);
            `logprobs.detach()` when each batch gets one optimiser step.
        behaviour_logprobs: the rollout engine's log-probs (the sampling policy).
        advantages: per-token advantages (see `advantages.py`).
        response_mask: true (or 1) on trained response tokens.
        ref_logprobs: the reference (base model) log-probs, for the KL loss and metric.
        entropy: per-token policy entropy, for the entropy bonus and metric.
    """

    logprobs: Tensor
    old_logprobs: Tensor
    behaviour_logprobs: Tensor
    advantages: Tensor
    response_mask: Tensor
    ref_logprobs: Tensor | None = None
    entropy: Tensor | None = None

    def __post_init__(self) -> None:
        shape = self.response_mask.shape
        if len(shape) != 2:
            raise ValueError(f"response_mask must be [B, T], got {tuple(shape)}")
        names = ("logprobs", "old_logprobs", "behaviour_logprobs", "advantages")
        for name in (*names, "ref_logprobs", "entropy"):
            t = getattr(self, name)
            if t is not None and t.shape != shape:
                raise ValueError(f"{name} {tuple(t.shape)} must match response_mask {tuple(shape)}")


@dataclass(frozen=True)
class LossOutputs:
    """`loss`: scalar to backpropagate. `metrics`: floats over this call's tokens
    (token means unless named otherwise), for logging."""

    loss: Tensor
    metrics: dict[str, float]


def _floats(metrics: dict[str, Tensor]) -> dict[str, float]:
    # One device sync for all metrics instead of one `.item()` each.
    values = torch.stack([v.detach().double() for v in metrics.values()]).tolist()
    return dict(zip(metrics, values, strict=True))


def policy_loss(
    inputs: LossInputs,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip_c: float | None = 3.0,
    tis_cap: float | None = 2.0,
    kl_coef: float = 0.0,
    kl_type: KlType | str = "k3",
    entropy_coef: float = 0.0,
    agg: AggMode | str = "token-mean",
    global_tokens: Normaliser | None = None,
    global_seqs: Normaliser | None = None,
    max_len: int | None = None,
) -> LossOutputs:
    """PPO clipped surrogate with truncated importance weights, KL loss and entropy bonus.

    Per token, with r = exp(logprobs - old_logprobs) and advantage A:
        pg = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))       PPO, Schulman et al. 2017
        pg = min(pg, -A dual_clip_c)  where A < 0                       dual-clip, Ye et al. 2020
        pg = pg * min(exp(old_logprobs - behaviour_logprobs), tis_cap)  TIS, Yao et al. 2025
    clip_high > clip_low is DAPO's clip-higher (Yu et al. 2025; 0.28 there), which leaves
    room for low-probability tokens to rise. The TIS weight is detached: it corrects the
    expectation over tokens that the behaviour policy sampled (stale adapter versions, vLLM
    numerics) without a gradient of its own; `tis_cap=None` turns it off.

    loss = agg(pg) + kl_coef * agg(kl_estimate(logprobs, ref, kl_type)) - entropy_coef *
    agg(entropy), every term aggregated with the same mode and normalisers (`loss_agg`).

    Metrics: `loss` and `pg_loss` are this call's share of the aggregated loss (they add up
    over micro-batches given global normalisers); the rest are token means over this call:
    pg_clipfrac (= _high + _low), dual_clipfrac, ppo_kl (mean old - new), behaviour_kl
    (mean behaviour - old: staleness plus numerics gap), tis_mean and tis_clipfrac (with
    `tis_cap=None`, tis_mean is the uncapped weight, reported but not applied), and kl /
    entropy when their inputs are given.
    """
    if not 0 <= clip_low < 1 or clip_high < 0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if dual_clip_c is not None and dual_clip_c <= 1:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    if tis_cap is not None and tis_cap <= 0:
        raise ValueError(f"tis_cap must be > 0, got {tis_cap}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and inputs.ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs LossInputs.ref_logprobs")
    if entropy_coef != 0 and inputs.entropy is None:
        raise ValueError("entropy_coef != 0 needs LossInputs.entropy")
    kl_fn = KL_ESTIMATORS.get(kl_type)

    def aggregate(x: Tensor) -> Tensor:
        return loss_agg(
            x, mask, agg, global_tokens=global_tokens, global_seqs=global_seqs, max_len=max_len
        )

    mask = inputs.response_mask.bool()
    adv = inputs.advantages.detach()
    old = inputs.old_logprobs.detach()
    # Zero the log-ratio on padding before exp (padding may hold -inf), and clamp it as
    # verl does so a wild token cannot overflow exp.
    log_ratio = torch.where(mask, inputs.logprobs - old, 0).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
    dual = torch.zeros_like(mask)
    if dual_clip_c is not None:
        dual = (adv < 0) & (pg > -adv * dual_clip_c)
        pg = torch.where(dual, -adv * dual_clip_c, pg)

    raw_is = torch.exp(torch.where(mask, old - inputs.behaviour_logprobs.detach(), 0))
    tis = raw_is if tis_cap is None else raw_is.clamp(max=tis_cap)
    if tis_cap is not None:
        pg = pg * tis

    pg_loss = aggregate(pg)
    loss = pg_loss
    ratio_d, dtype = ratio.detach(), ratio.dtype
    metrics: dict[str, Tensor] = {
        "pg_loss": pg_loss,
        "pg_clipfrac_high": masked_mean(((adv > 0) & (ratio_d > 1 + clip_high)).to(dtype), mask),
        "pg_clipfrac_low": masked_mean(((adv < 0) & (ratio_d < 1 - clip_low)).to(dtype), mask),
        "dual_clipfrac": masked_mean(dual.to(dtype), mask),
        "ppo_kl": masked_mean(-log_ratio.detach(), mask),
        "behaviour_kl": masked_mean(inputs.behaviour_logprobs.detach() - old, mask),
        "tis_mean": masked_mean(tis, mask),
        "tis_clipfrac": masked_mean((raw_is > tis_cap).to(dtype), mask)
        if tis_cap is not None
        else pg_loss.new_zeros(()),
    }
    metrics["pg_clipfrac"] = metrics["pg_clipfrac_high"] + metrics["pg_clipfrac_low"]
    if inputs.ref_logprobs is not None:
        kl = kl_fn(torch.where(mask, inputs.logprobs - inputs.ref_logprobs.detach(), 0))
        metrics["kl"] = masked_mean(kl.detach(), mask)
        if kl_coef > 0:
            loss = loss + kl_coef * aggregate(kl)
    if inputs.entropy is not None:
        metrics["entropy"] = masked_mean(inputs.entropy.detach(), mask)
        if entropy_coef != 0:
            loss = loss - entropy_coef * aggregate(inputs.entropy)
    metrics["loss"] = loss
    return LossOutputs(loss=loss, metrics=_floats(metrics))


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    *,
    clip: float | None = 0.2,
    agg: AggMode | str = "token-mean",
    global_tokens: Normaliser | None = None,
    global_seqs: Normaliser | None = None,
    max_len: int | None = None,
) -> LossOutputs:
    """PPO's clipped critic loss (Schulman et al. 2017, as in OpenAI baselines and verl):
    0.5 * max((V - R)^2, (clip(V, V_old - clip, V_old + clip) - R)^2) per token, where R
    are GAE's returns; `clip=None` is plain 0.5 * (V - R)^2."""
    mask = response_mask.bool()
    returns, old_values = returns.detach(), old_values.detach()
    unclipped = (values - returns) ** 2
    clipped_frac = torch.zeros((), dtype=values.dtype, device=values.device)
    losses = unclipped
    if clip is not None:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        clipped = (v_clipped - returns) ** 2
        losses = torch.maximum(unclipped, clipped)
        clipped_frac = masked_mean((clipped > unclipped).to(values.dtype), mask)
    loss = 0.5 * loss_agg(
        losses, mask, agg, global_tokens=global_tokens, global_seqs=global_seqs, max_len=max_len
    )
    metrics = {
        "vf_loss": loss,
        "vf_clipfrac": clipped_frac,
        "vpred_mean": masked_mean(values.detach(), mask),
    }
    return LossOutputs(loss=loss, metrics=_floats(metrics))
