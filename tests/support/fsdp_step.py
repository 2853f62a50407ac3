"""Run one learner update on a fixed batch and write the results (for the 1-rank vs 2-rank
test). Run directly (1 rank) or under torchrun (N ranks):

    python -m tests.support.fsdp_step MODEL OUT_DIR [MICRO] [ADVANTAGE]
    torchrun --nproc_per_node 2 -m tests.support.fsdp_step MODEL OUT_DIR [MICRO] [ADVANTAGE]

ADVANTAGE gae runs PPO with the critic (its adapter and value head are in the outputs too).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def policy_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def main(model: str, out: str, micro: int = 64, advantage: str = "grpo") -> None:
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    from safetensors.torch import save_file

    from services.learner.batch import broadcast, collate
    from services.learner.config import AlgoConfig, ModelConfig
    from services.learner.policy import Policy
    from services.learner.trainer import Trainer
    from tests.support.learner_batches import synthetic_groups

    torch.manual_seed(0)
    init = Path(out).parent / "init-adapter"
    if policy_rank() == 0 and not init.exists():
        from tests.support.peft_adapters import make_peft_adapter

        make_peft_adapter(model, init, seed=5, rank=8, b_std=0.05)
    if dist.is_initialized():
        dist.barrier()
    # One mini-batch and no clipping, so the gradients left after step() are the update's.
    algo = AlgoConfig(lr=1e-2, mini_batches=1, micro_batch_size=micro, kl_coef=0.01, entropy_coef=0.001,
                      tis_cap=2.0, grad_clip=1e9, advantage=advantage, lam=0.95, critic_lr=2e-2)
    critic = algo.needs_critic
    torch.manual_seed(0)  # the critic's fresh adapter and head: same start on every run and rank
    policy = Policy(ModelConfig(path=model, lora_rank=8, lora_alpha=16, init_adapter=str(init)), critic=critic)
    trainer = Trainer(policy, algo)

    def trained() -> dict[str, torch.Tensor]:
        out = policy.adapter_state_dict()
        if critic:  # the critic's adapter and head, gathered in full
            for n, p in policy.root.named_parameters():
                if policy._is_critic(n):
                    out[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        return out

    initial = trained()
    batch = broadcast(collate(synthetic_groups()) if policy.rank == 0 else None)
    metrics = trainer.step(batch)
    sd = trained()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
             for n, p in policy.root.named_parameters() if p.requires_grad}
    if policy.rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, f"{out}/adapter.safetensors")
        save_file({k: v.contiguous() for k, v in initial.items()}, f"{out}/initial.safetensors")
        save_file({k: v.contiguous() for k, v in grads.items()}, f"{out}/grads.safetensors")
        Path(f"{out}/metrics.json").write_text(json.dumps(metrics))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 64,
         sys.argv[4] if len(sys.argv) > 4 else "grpo")
