"""One RL update of the policy on a batch of trajectories (every rank runs it).

Advantages are computed once over the whole batch (group statistics need whole groups),
then each rank takes its rows, splits them into mini-batches (one optimizer step each) and
micro-batches (gradient accumulation). Every loss is normalised by the size of the whole
mini-batch across ranks, so 1 rank and N ranks, or any micro-batch split, give the same
loss and gradients (FSDP averages gradients over ranks, hence the `* world`).

PPO with a critic (`advantage = "gae"`): the critic (its own LoRA adapter on the same base
plus a value head, see `Policy(critic=True)`) gives V for every row before the update; GAE
turns rewards and V into advantages and returns; each micro-batch then takes a policy
backward and a critic backward (clipped value loss against the returns), and actor and
critic clip their gradients separately.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from services.learner import algorithms as A
from services.learner.batch import Batch, comm_device
from services.learner.config import AlgoConfig
from services.learner.policy import Policy

_ADVANTAGE_KW = {"reinforce_plus_plus": {"gamma"}, "reinforce_plus_plus_baseline": {"gamma"},
                 "gae": {"gamma", "lam"}}
# Loss terms come out already divided by the global normaliser: they add up over
# micro-batches and ranks. Every other metric is a masked mean: weight it by tokens.
_ADDITIVE = ("pg_loss", "loss", "vf_loss")


def _all_reduce_sum(values: dict[str, float], world: int) -> dict[str, float]:
    if world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return {k: float(v) for k, v in zip(keys, t, strict=True)}


class Trainer:
    def __init__(self, policy: Policy, cfg: AlgoConfig, temperature: float = 1.0, max_len: int | None = None) -> None:
        self.policy, self.cfg, self.temperature, self.max_len = policy, cfg, temperature, max_len
        self.critic = cfg.advantage == "gae"
        if self.critic and not policy.critic:
            raise ValueError("advantage 'gae' (PPO with a critic) needs Policy(..., critic=True)")
        groups = [{"params": policy.actor_parameters(), "lr": cfg.lr}]
        if policy.critic:
            groups.append({"params": policy.critic_parameters(), "lr": cfg.critic_lr or cfg.lr})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warm = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.rank, self.world = policy.rank, policy.world
        A.get_advantage_fn(cfg.advantage)  # fail fast on an unknown name

    # ------------------------------------------------------------ pieces

    def advantages(self, batch: Batch, penalty: torch.Tensor | None = None,
                   values: torch.Tensor | None = None) -> A.AdvantageOutputs:
        kw = {k: getattr(self.cfg, k) for k in _ADVANTAGE_KW.get(self.cfg.advantage, ()) if hasattr(self.cfg, k)}
        inputs = A.AdvantageInputs(rewards=batch.rewards.float(), response_mask=batch.response_mask,
                                   group_ids=batch.group_index, token_penalty=penalty, values=values)
        return A.get_advantage_fn(self.cfg.advantage)(inputs, **kw)

    @torch.no_grad()
    def _values(self, b: Batch) -> torch.Tensor:
        outs = [self.policy.values(mb.input_ids, mb.attention_mask)
                for mb in (b.rows(slice(i, i + self.cfg.micro_batch_size))
                           for i in range(0, b.size, self.cfg.micro_batch_size))]
        return torch.cat(outs) if outs else torch.zeros_like(b.behaviour_logprobs)

    @torch.no_grad()
    def _logprobs(self, b: Batch, reference: bool = False) -> torch.Tensor:
        outs = []
        for i in range(0, b.size, self.cfg.micro_batch_size):
            mb = b.rows(slice(i, i + self.cfg.micro_batch_size))
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
        """One update on `batch` (the same full batch on every rank)."""
        t0 = time.perf_counter()
        cfg = self.cfg
        batch = batch.to(self.policy.device)
        rows = torch.arange(batch.size, device=batch.input_ids.device)
        mine = rows[self.rank :: self.world]
        local = batch.rows(mine)
        old_lp = self._logprobs(local)
        ref_lp = self._logprobs(local, reference=True) if cfg.kl_coef > 0 or cfg.log_kl else None
        # Advantages need the whole batch (group statistics). With KL in the reward, every
        # rank needs every row's reference log-probs: rows are few here, so all compute all.
        penalty = None
        if cfg.kl_in_reward and cfg.kl_coef > 0:
            full_old, full_ref = self._logprobs(batch), self._logprobs(batch, reference=True)
            penalty = A.kl_reward_penalty(full_old, full_ref, batch.response_mask, kl_coef=cfg.kl_coef,
                                          kl_type=cfg.kl_type)
        # GAE whitens over the whole batch: every rank computes V for every row (rows are few).
        old_values = self._values(batch) if self.critic else None
        adv_out = self.advantages(batch, penalty, old_values)
        adv_local = adv_out.advantages[mine]
        if self.critic:
            old_v_local, returns_local = old_values[mine], adv_out.returns[mine]

        chunks = torch.tensor_split(rows, cfg.mini_batches)
        stats: dict[str, float] = {}
        cstats: dict[str, float] = {}
        n_updates, grad_norms, critic_norms = 0, [], []
        self.policy.root.train()
        for _epoch in range(cfg.ppo_epochs):
            for chunk in chunks:
                sel = chunk[chunk % self.world == self.rank] // self.world  # my rows of this chunk
                gtok = float(batch.response_mask[chunk].sum())
                gseq = float(len(chunk))
                self.optimizer.zero_grad(set_to_none=True)
                for i in range(0, len(sel), cfg.micro_batch_size):
                    idx = sel[i : i + cfg.micro_batch_size]
                    mb = local.rows(idx)
                    lp, ent = self.policy.token_logprobs(mb.input_ids, mb.attention_mask, self.temperature,
                                                         with_entropy=True, entropy_grad=cfg.entropy_coef != 0)
                    out = A.policy_loss(
                        A.LossInputs(logprobs=lp, old_logprobs=old_lp[idx], behaviour_logprobs=mb.behaviour_logprobs,
                                     advantages=adv_local[idx], response_mask=mb.response_mask,
                                     ref_logprobs=ref_lp[idx] if ref_lp is not None and not cfg.kl_in_reward else None,
                                     entropy=ent),
                        clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip_c=cfg.dual_clip_c,
                        tis_cap=cfg.tis_cap, kl_coef=0.0 if cfg.kl_in_reward else cfg.kl_coef, kl_type=cfg.kl_type,
                        entropy_coef=cfg.entropy_coef, agg=cfg.loss_agg,
                        global_tokens=gtok, global_seqs=gseq, max_len=self.max_len,
                    )
                    (out.loss * self.world).backward()
                    ntok = float(mb.response_mask.sum())
                    stats["_tokens"] = stats.get("_tokens", 0.0) + ntok
                    for k, v in out.metrics.items():
                        stats[k] = stats.get(k, 0.0) + float(v) * (1.0 if k in _ADDITIVE else ntok)
                    if self.critic:
                        v = self.policy.values(mb.input_ids, mb.attention_mask)
                        vout = A.value_loss(v, old_v_local[idx], returns_local[idx], mb.response_mask,
                                            clip=cfg.value_clip, agg=cfg.loss_agg, global_tokens=gtok,
                                            global_seqs=gseq, max_len=self.max_len)
                        (vout.loss * self.world).backward()
                        for k, val in vout.metrics.items():
                            cstats[k] = cstats.get(k, 0.0) + float(val) * (1.0 if k in _ADDITIVE else ntok)
                grad_norms.append(self._clip(self.policy.actor_parameters()))
                if self.critic:
                    critic_norms.append(self._clip(self.policy.critic_parameters()))
                self.optimizer.step()
                self.scheduler.step()
                n_updates += 1
        total = _all_reduce_sum({**stats, **{f"critic/{k}": v for k, v in cstats.items()}}, self.world)
        tokens_seen = max(total.pop("_tokens", 0.0), 1.0)
        metrics = {(k if k.startswith("critic/") else f"actor/{k}"):
                   v / (len(chunks) * cfg.ppo_epochs if k.split("/")[-1] in _ADDITIVE else tokens_seen)
                   for k, v in total.items()}
        metrics["actor/grad_norm"] = sum(grad_norms) / max(1, len(grad_norms))
        if self.critic:
            mask = batch.response_mask.bool()
            metrics["critic/grad_norm"] = sum(critic_norms) / max(1, len(critic_norms))
            metrics["critic/returns_mean"] = float(adv_out.returns[mask].mean())
            metrics["critic/values_mean"] = float(old_values[mask].mean())
            # Fraction of the returns' variance the critic explained before this update.
            var_r = float(adv_out.returns[mask].var())
            metrics["critic/explained_var"] = (1.0 - float((adv_out.returns - old_values)[mask].var()) / var_r
                                               if var_r > 0 else float("nan"))
        metrics["actor/lr"] = self.scheduler.get_last_lr()[0]
        tokens = float(batch.response_mask.sum() + batch.attention_mask.sum())
        metrics["timing_s/update"] = time.perf_counter() - t0
        metrics["perf/update_tokens_per_s"] = tokens * cfg.ppo_epochs / max(metrics["timing_s/update"], 1e-9)
        metrics["actor/updates"] = n_updates
        return {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
