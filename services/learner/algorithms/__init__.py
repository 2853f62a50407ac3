"""RL algorithms of the learner as pure functions over tensors: advantage estimators,
policy/value losses, KL estimators and loss aggregation. No trainer state lives here.

Registries pick them by name: `get_advantage_fn`, `AGG_MODES`, `KL_ESTIMATORS`; an estimator's
signature says which settings it takes (`advantage_kwargs`), its registration whether it
needs a critic (`advantage_needs_values`).
"""

from .advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    AdvantageOutputs,
    GroupStats,
    advantage_kwargs,
    advantage_needs_values,
    discounted_returns,
    dr_grpo_advantages,
    gae_advantages,
    get_advantage_fn,
    group_stats,
    grpo_advantages,
    masked_whiten,
    register_advantage,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    sequence_returns,
    token_rewards,
)
from .aggregation import AGG_MODES, AggMode, loss_agg, masked_mean
from .losses import (
    KL_ESTIMATORS,
    KlType,
    LossInputs,
    LossOutputs,
    kl_estimate,
    kl_reward_penalty,
    policy_loss,
    value_loss,
)
from .registry import Registry, UnknownName

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGG_MODES",
    "KL_ESTIMATORS",
    "AdvantageInputs",
    "AdvantageOutputs",
    "AggMode",
    "GroupStats",
    "KlType",
    "LossInputs",
    "LossOutputs",
    "Registry",
    "UnknownName",
    "advantage_kwargs",
    "advantage_needs_values",
    "discounted_returns",
    "dr_grpo_advantages",
    "gae_advantages",
    "get_advantage_fn",
    "group_stats",
    "grpo_advantages",
    "kl_estimate",
    "kl_reward_penalty",
    "loss_agg",
    "masked_mean",
    "masked_whiten",
    "policy_loss",
    "register_advantage",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
    "sequence_returns",
    "token_rewards",
    "value_loss",
]
