"""One RL update of the policy on a batch of trajectories (every rank runs it).

Advantages are computed once over the whole batch (group statistics need whole groups),
then each rank takes its rows, splits them into mini-batches (one optimizer step each) and
micro-batches (gradient accumulation). Every loss is normalised by the size of the whole
mini-batch across ranks, so 1 rank and N ranks, or any micro-batch split, give the same
loss and gradients (FSDP averages gradients over ranks, hence the `* world`).

PPO with a critic (`AlgoConfig.needs_critic`: `advantage = "gae"`): the critic (its own
LoRA adapter on the same base plus a value head, see `Policy(critic=True)`) gives V for
every row before the update; GAE turns rewards and V into advantages and returns; each
micro-batch then takes a policy backward and a critic backward (clipped value loss against
the returns), and actor and critic clip their gradients separately.

`step` reads as `_prepare` (no gradient) -> `_update` (the micro-steps) -> `_summary`;
`Rows` is the one rule for which rows each rank and micro-batch takes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from services.learner import algorithms as A
from services.learner.batch import Batch, comm_device
from services.learner.policy import Policy

if TYPE_CHECKING:  # an annotation only: importing the trainer needs no pydantic (tests/gpu/smoke.py)
    from services.learner.config import AlgoConfig

# Loss terms come out already divided by the global normaliser: they add up over
# micro-batches and ranks. Every other metric is a masked mean: weight it by tokens.
_ADDITIVE = ("pg_loss", "loss", "vf_loss")


def adaptive_kl_coef(coef: float, current_kl: float, target_kl: float, n_steps: int, horizon: int) -> float:
    """One step of the adaptive KL controller (Ziegler et al. 2019; verl's AdaptiveKLController):
    coef * (1 + clip(current_kl / target_kl - 1, -0.2, 0.2) * n_steps / horizon)."""
    error = min(max(current_kl / target_kl - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)


def _all_reduce_sum(values: dict[str, float], world: int) -> dict[str, float]:
    if world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return {k: float(v) for k, v in zip(keys, t, strict=True)}


@dataclass(frozen=True)
class Rows:
    """Which rows each rank and micro-batch takes, written once: row i of the batch lives on
    rank i % world, at position i // world of that rank's shard (rows rank, rank + world,
    ...), and a rank runs its rows in consecutive micro-batches of `micro` rows."""

    rank: int
    world: int
    micro: int

    def mine(self, rows: torch.Tensor) -> torch.Tensor:
        """The batch rows among `rows` (row indices) that this rank holds, in order."""
        return rows[rows % self.world == self.rank]

    def local(self, rows: torch.Tensor) -> torch.Tensor:
        """Where this rank's rows among `rows` sit in its shard."""
        return self.mine(rows) // self.world

    def micro_batches(self, n: int) -> list[slice]:
        """Consecutive micro-batches over n rows."""
        return [slice(i, i + self.micro) for i in range(0, n, self.micro)]


@dataclass(frozen=True)
class _Prepared:
    """What the update reads, fixed before its first optimizer step (no gradient).
    `batch` is the whole batch, `local` this rank's rows; the other per-row tensors are
    this rank's rows unless named `batch_*`."""

    batch: Batch
    local: Batch
    old_logprobs: torch.Tensor | None  # None: the update's own log-probs, detached (one optimizer step)
    ref_logprobs: torch.Tensor | None  # for the KL loss and metric; None with KL in the reward
    advantages: torch.Tensor
    returns: torch.Tensor | None = None  # the critic's targets (with a critic)
    old_values: torch.Tensor | None = None  # V before the update (with a critic)
    batch_returns: torch.Tensor | None = None
    batch_values: torch.Tensor | None = None
    reward_kl: dict[str, float] = field(default_factory=dict)  # in-reward KL and its coefficient, for the metrics


@dataclass
class _Sums:
    """Micro-batch metrics summed over the update: loss terms (`_ADDITIVE`) as they are,
    every other one weighted by its micro-batch's response tokens (counted in `_tokens`);
    critic metrics under `critic/`. Also the gradient norms of each optimizer step."""

    sums: dict[str, float] = field(default_factory=dict)
    grad_norms: list[float] = field(default_factory=list)
    critic_norms: list[float] = field(default_factory=list)

    def add(self, metrics: dict[str, float], tokens: float, prefix: str = "") -> None:
        for k, v in metrics.items():
            key = prefix + k
            self.sums[key] = self.sums.get(key, 0.0) + float(v) * (1.0 if k in _ADDITIVE else tokens)

    def count_tokens(self, tokens: float) -> None:
        self.sums["_tokens"] = self.sums.get("_tokens", 0.0) + tokens


class Trainer:
    def __init__(self, policy: Policy, cfg: AlgoConfig, temperature: float = 1.0, max_len: int | None = None) -> None:
        self.policy, self.cfg, self.temperature, self.max_len = policy, cfg, temperature, max_len
        self.critic = cfg.needs_critic  # also fails fast on an unknown estimator name
        if self.critic and not policy.critic:
            raise ValueError(f"advantage {cfg.advantage!r} (PPO with a critic) needs Policy(..., critic=True)")
        groups = [{"params": policy.actor_parameters(), "lr": cfg.lr}]
        if policy.critic:
            groups.append({"params": policy.critic_parameters(), "lr": cfg.critic_lr or cfg.lr})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warm = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.rank, self.world = policy.rank, policy.world
        # With one optimizer step per batch the parameters do not move before the last
        # micro-batch's forward, so the old log-probs are the update's own, detached: no
        # forward of their own (TRL does the same with num_iterations=1).
        self.reuse_old_logprobs = cfg.ppo_epochs == 1 and cfg.mini_batches == 1
        self.updates = 0  # steps taken by this trainer (since its process started)
        # The in-reward KL coefficient now: kl_coef, or where the adaptive controller has moved
        # it (checkpointed with the run; every rank computes the same from the same batch).
        self.kl_coef_now = cfg.kl_coef

    @property
    def rows(self) -> Rows:
        return Rows(self.rank, self.world, self.cfg.micro_batch_size)

    # ------------------------------------------------------------ pieces

    def advantages(self, batch: Batch, penalty: torch.Tensor | None = None,
                   values: torch.Tensor | None = None) -> A.AdvantageOutputs:
        """The configured estimator over the whole batch, given the settings its signature names."""
        kw = A.advantage_kwargs(self.cfg.advantage, self.cfg.model_dump())
        inputs = A.AdvantageInputs(rewards=batch.rewards.float(), response_mask=batch.response_mask,
                                   group_ids=batch.group_index, token_penalty=penalty, values=values)
        return A.get_advantage_fn(self.cfg.advantage)(inputs, **kw)

    @torch.no_grad()
    def _values(self, b: Batch) -> torch.Tensor:
        outs = [self.policy.values(mb.input_ids, mb.attention_mask)
                for mb in (b.rows(s) for s in self.rows.micro_batches(b.size))]
        return torch.cat(outs) if outs else torch.zeros_like(b.behaviour_logprobs)

    @torch.no_grad()
    def _logprobs(self, b: Batch, reference: bool = False) -> torch.Tensor:
        outs = []
        for s in self.rows.micro_batches(b.size):
            mb = b.rows(s)
            if reference:
                with self.policy.reference():
                    lp, _ = self.policy.token_logprobs(mb.input_ids, mb.attention_mask, self.temperature)
            else:
                lp, _ = self.policy.token_logprobs(mb.input_ids, mb.attention_mask, self.temperature)
            outs.append(lp)
        return torch.cat(outs) if outs else torch.zeros_like(b.behaviour_logprobs)

    def _clip(self, params: list) -> float:
        gn = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        return float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)

    # ------------------------------------------------------------ the update

    def step(self, batch: Batch) -> dict[str, float]:
        """One update on `batch` (the same full batch on every rank): prepare, then the
        micro-steps of every mini-batch and epoch, then the metrics."""
        t0, c0 = time.perf_counter(), time.thread_time()
        prep = self._prepare(batch.to(self.policy.device))
        sums = self._update(prep)
        self.updates += 1
        out = self._summary(prep, sums, t0)
        # CPU time of this thread: well under timing_s/update means the update waited (for the
        # GIL, or for a core another process was given).
        out["timing_s/update_cpu"] = time.thread_time() - c0
        return out

    def _prepare(self, batch: Batch) -> _Prepared:
        """This rank's rows with their old (and reference) log-probs, and the advantages,
        which need the whole batch (group statistics, batch whitening)."""
        cfg = self.cfg
        mine = self.rows.mine(torch.arange(batch.size, device=batch.input_ids.device))
        local = batch.rows(mine)
        old_lp = None if self.reuse_old_logprobs else self._logprobs(local)
        measure_kl = cfg.log_kl and self.updates % cfg.log_kl_every == 0
        ref_lp = self._logprobs(local, reference=True) if cfg.kl_coef > 0 or measure_kl else None
        # With KL in the reward, every rank needs every row's reference log-probs: rows are
        # few here, so all compute all.
        penalty = None
        reward_kl: dict[str, float] = {}
        if cfg.kl_in_reward and cfg.kl_coef > 0:
            full_old, full_ref = self._logprobs(batch), self._logprobs(batch, reference=True)
            coef = self.kl_coef_now
            penalty = A.kl_reward_penalty(full_old, full_ref, batch.response_mask, kl_coef=coef,
                                          kl_type=cfg.kl_type)
            # verl's actor/reward_kl_penalty: the per-sequence token-mean KL, averaged over the batch.
            mask = batch.response_mask.bool()
            per_seq = (penalty / coef).sum(-1) / mask.sum(-1).clamp(min=1)
            current = float(per_seq.mean())
            reward_kl = {"actor/reward_kl_penalty": current, "actor/reward_kl_penalty_coeff": coef}
            if cfg.kl_ctrl == "adaptive":
                assert cfg.kl_target is not None
                self.kl_coef_now = adaptive_kl_coef(coef, current, cfg.kl_target, batch.size, cfg.kl_horizon)
        # GAE whitens over the whole batch: every rank computes V for every row (rows are few).
        values = self._values(batch) if self.critic else None
        adv = self.advantages(batch, penalty, values)
        critic = {} if values is None else {"returns": adv.returns[mine], "old_values": values[mine],
                                            "batch_returns": adv.returns, "batch_values": values}
        return _Prepared(batch=batch, local=local, old_logprobs=old_lp,
                         ref_logprobs=None if cfg.kl_in_reward else ref_lp, advantages=adv.advantages[mine],
                         reward_kl=reward_kl, **critic)

    def _update(self, p: _Prepared) -> _Sums:
        """ppo_epochs passes over the batch in mini_batches chunks, one optimizer step each,
        the gradient accumulated over this rank's micro-batches of the chunk. Every loss is
        normalised by the whole chunk across ranks (tokens, sequences)."""
        cfg = self.cfg
        chunks = torch.tensor_split(torch.arange(p.batch.size, device=p.batch.input_ids.device), cfg.mini_batches)
        sums = _Sums()
        self.policy.root.train()
        for _epoch in range(cfg.ppo_epochs):
            for chunk in chunks:
                norm = {"global_tokens": float(p.batch.response_mask[chunk].sum()),
                        "global_seqs": float(len(chunk)), "max_len": self.max_len}
                self.optimizer.zero_grad(set_to_none=True)
                mine = self.rows.local(chunk)
                for s in self.rows.micro_batches(len(mine)):
                    self._micro_step(p, mine[s], norm, sums)
                sums.grad_norms.append(self._clip(self.policy.actor_parameters()))
                if self.critic:
                    sums.critic_norms.append(self._clip(self.policy.critic_parameters()))
                self.optimizer.step()
                self.scheduler.step()
        return sums

    def _micro_step(self, p: _Prepared, idx: torch.Tensor, norm: dict[str, Any], sums: _Sums) -> None:
        """Policy (and critic) backward on the local rows `idx`; FSDP averages gradients
        over ranks, hence the `* world`."""
        cfg = self.cfg
        mb = p.local.rows(idx)
        lp, ent = self.policy.token_logprobs(mb.input_ids, mb.attention_mask, self.temperature,
                                             with_entropy=True, entropy_grad=cfg.entropy_coef != 0)
        out = A.policy_loss(
            A.LossInputs(logprobs=lp, old_logprobs=lp.detach() if p.old_logprobs is None else p.old_logprobs[idx],
                         behaviour_logprobs=mb.behaviour_logprobs,
                         advantages=p.advantages[idx], response_mask=mb.response_mask,
                         ref_logprobs=p.ref_logprobs[idx] if p.ref_logprobs is not None else None, entropy=ent),
            clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip_c=cfg.dual_clip_c, tis_cap=cfg.tis_cap,
            kl_coef=0.0 if cfg.kl_in_reward else cfg.kl_coef, kl_type=cfg.kl_type,
            entropy_coef=cfg.entropy_coef, agg=cfg.loss_agg, **norm,
        )
        (out.loss * self.world).backward()
        ntok = float(mb.response_mask.sum())
        sums.count_tokens(ntok)
        sums.add(out.metrics, ntok)
        if self.critic:
            assert p.old_values is not None and p.returns is not None
            v = self.policy.values(mb.input_ids, mb.attention_mask)
            vout = A.value_loss(v, p.old_values[idx], p.returns[idx], mb.response_mask,
                                clip=cfg.value_clip, agg=cfg.loss_agg, **norm)
            (vout.loss * self.world).backward()
            sums.add(vout.metrics, ntok, prefix="critic/")

    def _summary(self, p: _Prepared, sums: _Sums, t0: float) -> dict[str, float]:
        """Metrics summed over ranks: loss terms averaged over optimizer steps, the rest
        token means; NaNs left out."""
        cfg = self.cfg
        total = _all_reduce_sum(sums.sums, self.world)
        tokens_seen = max(total.pop("_tokens", 0.0), 1.0)
        n_updates = len(sums.grad_norms)
        metrics = {(k if k.startswith("critic/") else f"actor/{k}"):
                   v / (n_updates if k.split("/")[-1] in _ADDITIVE else tokens_seen)
                   for k, v in total.items()}
        metrics["actor/grad_norm"] = sum(sums.grad_norms) / max(1, n_updates)
        if self.critic:
            assert p.batch_returns is not None and p.batch_values is not None
            mask = p.batch.response_mask.bool()
            returns, values = p.batch_returns, p.batch_values
            metrics["critic/grad_norm"] = sum(sums.critic_norms) / max(1, len(sums.critic_norms))
            metrics["critic/returns_mean"] = float(returns[mask].mean())
            metrics["critic/values_mean"] = float(values[mask].mean())
            # Fraction of the returns' variance the critic explained before this update.
            var_r = float(returns[mask].var())
            metrics["critic/explained_var"] = (1.0 - float((returns - values)[mask].var()) / var_r
                                               if var_r > 0 else float("nan"))
        metrics["actor/lr"] = self.scheduler.get_last_lr()[0]
        metrics.update(p.reward_kl)
        tokens = float(p.batch.response_mask.sum() + p.batch.attention_mask.sum())
        metrics["timing_s/update"] = time.perf_counter() - t0
        metrics["perf/update_tokens_per_s"] = tokens * cfg.ppo_epochs / max(metrics["timing_s/update"], 1e-9)
        metrics["actor/updates"] = n_updates
        return {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
