"""Advantage estimators: outcome rewards [B] (and optional per-token penalties) -> [B, T].

Group statistics (GRPO, RLOO) and batch whitening (REINFORCE++, GAE) are batch-level, so
the trainer computes advantages once over the whole batch, then splits it into
micro-batches. Advantages are targets: they are computed without gradient.

Pick one by name: `get_advantage_fn("grpo")(inputs)`; `ADVANTAGE_ESTIMATORS.names()` lists
them. Each estimator takes only the keyword arguments it uses, so a misplaced one (say
`lam` for GRPO) is a TypeError rather than silently ignored; its signature is the one place
that says which settings it takes (`advantage_kwargs`). An estimator registered with
`needs_values=True` reads a critic's values, so the learner trains a critic for it
(`advantage_needs_values`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .registry import Registry


@dataclass(frozen=True)
class AdvantageInputs:
    """What the estimators read. Shapes: B samples, T response positions.

    Attributes:
        rewards: [B] outcome reward of each sample.
        response_mask: [B, T] true (or 1) on the response tokens that are trained on.
        group_ids: [B] integer; the samples of one prompt share an id (GRPO, RLOO,
            REINFORCE++-baseline).
        values: [B, T] critic values V(s_t) at each response token (GAE only).
        token_penalty: [B, T] subtracted from the reward at every response token: KL in
            the reward, see `kl_reward_penalty`. Outcome estimators (GRPO, RLOO) subtract its
            sum over the sequence; token-level ones (REINFORCE++, GAE) discount it.
    """

    rewards: Tensor
    response_mask: Tensor
    group_ids: Tensor | None = None
    values: Tensor | None = None
    token_penalty: Tensor | None = None

    def __post_init__(self) -> None:
        if self.rewards.dim() != 1:
            raise ValueError(f"rewards must be [B], got {tuple(self.rewards.shape)}")
        b = self.rewards.shape[0]
        if self.response_mask.dim() != 2 or self.response_mask.shape[0] != b:
            raise ValueError(
                f"response_mask must be [B={b}, T], got {tuple(self.response_mask.shape)}"
            )
        if self.group_ids is not None and (
            self.group_ids.shape != (b,) or self.group_ids.is_floating_point()
        ):
            raise ValueError(f"group_ids must be an integer [B={b}] tensor")
        for name in ("values", "token_penalty"):
            t = getattr(self, name)
            if t is not None and t.shape != self.response_mask.shape:
                raise ValueError(
                    f"{name} {tuple(t.shape)} must match response_mask "
                    f"{tuple(self.response_mask.shape)}"
                )


@dataclass(frozen=True)
class AdvantageOutputs:
    """advantages: [B, T], zero outside the mask. returns: [B, T] the (undiscounted for
    outcome estimators, discounted for REINFORCE++/GAE) returns; GAE's are critic targets."""

    advantages: Tensor
    returns: Tensor


@dataclass(frozen=True)
class GroupStats:
    """Per-sample statistics of the sample's group, each [B]. `std` is the unbiased
    sample std (torch.std, as verl and TRL); a group of one has std 0."""

    mean: Tensor
    std: Tensor
    size: Tensor


AdvantageFn = Callable[..., AdvantageOutputs]
ADVANTAGE_ESTIMATORS: Registry[AdvantageFn] = Registry("advantage estimator")
_NEEDS_VALUES: set[str] = set()


def register_advantage(name: str, *, needs_values: bool = False) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register an estimator as `name` in `ADVANTAGE_ESTIMATORS`. `needs_values`: it reads
    `AdvantageInputs.values`, a critic's V(s_t) (GAE), so the learner trains a critic for it."""

    def decorate(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGE_ESTIMATORS.register(name)(fn)
        if needs_values:
            _NEEDS_VALUES.add(name)
        return fn

    return decorate


def get_advantage_fn(name: str) -> AdvantageFn:
    """The estimator registered as `name`; `UnknownName` lists the valid ones."""
    return ADVANTAGE_ESTIMATORS.get(name)


def advantage_needs_values(name: str) -> bool:
    """Whether estimator `name` reads a critic's values (PPO with a critic); `UnknownName`
    for a name that is not registered."""
    ADVANTAGE_ESTIMATORS.get(name)
    return name in _NEEDS_VALUES


def advantage_kwargs(name: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `settings` that estimator `name` takes: those named like one of its
    keyword-only parameters (GAE's gamma and lam, REINFORCE++'s gamma), read from its
    signature. Parameters that `settings` does not name keep their defaults."""
    params = inspect.signature(ADVANTAGE_ESTIMATORS.get(name)).parameters.values()
    return {p.name: settings[p.name] for p in params if p.kind is p.KEYWORD_ONLY and p.name in settings}


def group_stats(scores: Tensor, group_ids: Tensor) -> GroupStats:
    """Mean, unbiased std and size of each sample's group, vectorised with index_add."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    zeros = scores.new_zeros(n_groups)
    size = zeros.index_add(0, inv, torch.ones_like(scores))
    mean = zeros.index_add(0, inv, scores) / size
    sq_dev = zeros.index_add(0, inv, (scores - mean[inv]) ** 2)
    std = (sq_dev / (size - 1).clamp(min=1)).sqrt()
    return GroupStats(mean=mean[inv], std=std[inv], size=size[inv])


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (unbiased var, as verl's
    `masked_whiten`); zero outside the mask."""
    mask = mask.bool()
    n = mask.sum()
    mean = torch.where(mask, x, 0).sum() / n.clamp(min=1)
    centred = torch.where(mask, x - mean, 0)
    var = (centred**2).sum() / (n - 1).clamp(min=1)
    return centred * torch.rsqrt(var + eps)


def token_rewards(
    rewards: Tensor, response_mask: Tensor, token_penalty: Tensor | None = None
) -> Tensor:
    """[B, T] rewards: the outcome reward on each sample's last response token, minus
    `token_penalty` on every response token. A sample without response tokens gets none."""
    mask = response_mask.bool()
    out = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    if token_penalty is not None:
        out = out - torch.where(mask, token_penalty, 0).to(rewards.dtype)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, positions, -1).amax(dim=-1)
    rows = (last >= 0).nonzero().squeeze(-1)
    out[rows, last[rows]] += rewards[rows]
    return out


def discounted_returns(rewards: Tensor, response_mask: Tensor, gamma: float) -> Tensor:
    """G_t = r_t + gamma * G_{t+1} over response tokens; positions outside the mask are
    skipped (the discount counts response tokens only) and hold 0."""
    mask = response_mask.bool()
    out = torch.zeros_like(rewards)
    running = rewards.new_zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, running)
        out[:, t] = torch.where(mask[:, t], running, 0)
    return out


def sequence_returns(inputs: AdvantageInputs) -> Tensor:
    """[B] outcome reward minus the sequence's summed token penalty."""
    if inputs.token_penalty is None:
        return inputs.rewards
    penalty = torch.where(inputs.response_mask.bool(), inputs.token_penalty, 0).sum(-1)
    return inputs.rewards - penalty.to(inputs.rewards.dtype)


def _require(t: Tensor | None, what: str, estimator: str) -> Tensor:
    if t is None:
        raise ValueError(f"{estimator} needs AdvantageInputs.{what}")
    return t


def _broadcast(per_sample: Tensor, returns: Tensor, mask: Tensor) -> AdvantageOutputs:
    m = mask.bool()
    return AdvantageOutputs(
        advantages=torch.where(m, per_sample[:, None], 0),
        returns=torch.where(m, returns[:, None], 0),
    )


@register_advantage("grpo")
@torch.no_grad()
def grpo_advantages(
    inputs: AdvantageInputs, *, norm_by_std: bool = True, eps: float = 1e-6
) -> AdvantageOutputs:
    """GRPO outcome supervision (Shao et al. 2024, DeepSeekMath, sec. 4.1.2):
    A_i = (r_i - mean(r_group)) / (std(r_group) + eps) on every token of sample i.

    `norm_by_std=False` is Dr. GRPO's advantage (Liu et al. 2025, "Understanding
    R1-Zero-Like Training"): dividing by the std up-weights prompts that are nearly always
    or never solved. A group of one carries no relative signal and gets 0 (verl passes
    its raw score through instead).
    """
    scores = sequence_returns(inputs)
    stats = group_stats(scores, _require(inputs.group_ids, "group_ids", "grpo"))
    adv = scores - stats.mean
    if norm_by_std:
        adv = adv / (stats.std + eps)
    return _broadcast(adv, scores, inputs.response_mask)


@register_advantage("dr_grpo")
def dr_grpo_advantages(inputs: AdvantageInputs) -> AdvantageOutputs:
    """Dr. GRPO (Liu et al. 2025): GRPO without the std division. Pair it with the
    `seq-mean-token-sum-norm` aggregation for the paper's unbiased objective."""
    return grpo_advantages(inputs, norm_by_std=False)


@register_advantage("rloo")
@torch.no_grad()
def rloo_advantages(inputs: AdvantageInputs) -> AdvantageOutputs:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019):
    A_i = r_i - mean_{j != i} r_j = n/(n-1) * (r_i - mean(r_group)). A group of one has no
    baseline and gets 0."""
    scores = sequence_returns(inputs)
    stats = group_stats(scores, _require(inputs.group_ids, "group_ids", "rloo"))
    n = stats.size
    adv = torch.where(n > 1, (scores - stats.mean) * n / (n - 1).clamp(min=1), 0)
    return _broadcast(adv, scores, inputs.response_mask)


@register_advantage("reinforce_plus_plus")
@torch.no_grad()
def reinforce_pp_advantages(inputs: AdvantageInputs, *, gamma: float = 1.0) -> AdvantageOutputs:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): the outcome reward on the last token minus
    per-token penalties (KL in the reward), discounted returns G_t, then whitened over all
    response tokens of the batch (global advantage normalisation, no critic)."""
    rewards = token_rewards(inputs.rewards, inputs.response_mask, inputs.token_penalty)
    returns = discounted_returns(rewards, inputs.response_mask, gamma)
    return AdvantageOutputs(masked_whiten(returns, inputs.response_mask), returns)


@register_advantage("reinforce_plus_plus_baseline")
@torch.no_grad()
def reinforce_pp_baseline_advantages(
    inputs: AdvantageInputs, *, gamma: float = 1.0
) -> AdvantageOutputs:
    """REINFORCE++-baseline (Hu 2025): as REINFORCE++, with the group mean of the outcome
    rewards subtracted first (the penalties are then added per token, as OpenRLHF does)."""
    group_ids = _require(inputs.group_ids, "group_ids", "reinforce_plus_plus_baseline")
    centred = inputs.rewards - group_stats(inputs.rewards, group_ids).mean
    rewards = token_rewards(centred, inputs.response_mask, inputs.token_penalty)
    returns = discounted_returns(rewards, inputs.response_mask, gamma)
    return AdvantageOutputs(masked_whiten(returns, inputs.response_mask), returns)


@register_advantage("gae", needs_values=True)
@torch.no_grad()
def gae_advantages(
    inputs: AdvantageInputs, *, gamma: float = 1.0, lam: float = 1.0, whiten: bool = True
) -> AdvantageOutputs:
    """Generalised advantage estimation (Schulman et al. 2015) for PPO with a critic:
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, with V = 0
    after the last response token (the episode ends). Positions outside the mask are
    skipped. returns = A + V (unwhitened) are the critic's targets; the advantages are
    whitened over the batch unless `whiten=False`."""
    values = _require(inputs.values, "values", "gae")
    mask = inputs.response_mask.bool()
    rewards = token_rewards(inputs.rewards, mask, inputs.token_penalty)
    values = values.to(rewards.dtype)
    adv = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(rewards.shape[0])
    last_gae = rewards.new_zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # `where`, not arithmetic masking: padded values may be garbage (even nan).
        last_gae = torch.where(m, delta + gamma * lam * last_gae, last_gae)
        next_value = torch.where(m, values[:, t], next_value)
        adv[:, t] = torch.where(m, last_gae, 0)
    returns = torch.where(mask, adv + values, 0)
    return AdvantageOutputs(masked_whiten(adv, mask) if whiten else adv, returns)
