"""The learner's update (issue 4, points 1 and 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from tests.support.learner_batches import synthetic_groups
from tests.support.procs import free_port


def test_one_update_changes_every_lora_param_and_no_base_param(tiny_model):
    from services.learner.batch import collate
    from services.learner.config import AlgoConfig, ModelConfig
    from services.learner.policy import Policy
    from services.learner.trainer import Trainer

    torch.manual_seed(0)
    policy = Policy(ModelConfig(path=str(tiny_model), lora_rank=8, lora_alpha=16))
    # Two mini-batches (two optimizer steps in the update): peft starts B at zero, so the
    # first step can only move B; A gets a gradient once B is non-zero.
    trainer = Trainer(policy, AlgoConfig(lr=1e-2, mini_batches=2, kl_coef=0.01))
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    metrics = trainer.step(collate(synthetic_groups()))
    lora = [n for n in before if "lora_" in n]
    base = [n for n in before if "lora_" not in n]
    assert lora and base
    params = dict(policy.model.named_parameters())
    unchanged_lora = [n for n in lora if torch.equal(params[n], before[n])]
    changed_base = [n for n in base if not torch.equal(params[n], before[n])]
    assert not unchanged_lora, unchanged_lora
    assert not changed_base, changed_base
    for key in ("actor/pg_loss", "actor/entropy", "actor/ppo_kl", "actor/grad_norm"):
        assert key in metrics and metrics[key] == metrics[key]  # present and not NaN


def _run(model, out, nproc: int, micro: int = 64) -> tuple[dict, dict, dict, dict]:
    if nproc == 1:
        cmd = [sys.executable, "-m", "tests.support.fsdp_step", str(model), str(out), str(micro)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "tests.support.fsdp_step", str(model), str(out), str(micro)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return (json.loads((out / "metrics.json").read_text()), load_file(str(out / "adapter.safetensors")),
            load_file(str(out / "initial.safetensors")), load_file(str(out / "grads.safetensors")))


def test_two_ranks_equal_one_rank_and_micro_batches_do_not_matter(tiny_model, tmp_path):
    """Same batch, same starting adapter: 1 rank, 2 FSDP ranks on gloo, and 1 rank in
    micro-batches of 3 give the same loss, gradients and update."""
    m1, a1, i1, g1 = _run(tiny_model, tmp_path / "r1", 1)
    m2, a2, i2, g2 = _run(tiny_model, tmp_path / "r2", 2)
    m3, a3, _, g3 = _run(tiny_model, tmp_path / "r1-micro3", 1, micro=3)
    assert set(a1) == set(a2) == set(a3) and set(g1) == set(g2) == set(g3)
    assert all(torch.equal(i1[k], i2[k]) for k in i1)  # same start
    for k in g1:
        # fp32: gloo sums the ranks' gradients in another order than one process, ~1e-7 relative.
        scale = g1[k].abs().max()
        assert scale > 0, k
        assert (g1[k] - g2[k]).abs().max() <= 1e-5 * scale, (k, float((g1[k] - g2[k]).abs().max() / scale))
        assert (g1[k] - g3[k]).abs().max() <= 1e-5 * scale, (k, float((g1[k] - g3[k]).abs().max() / scale))
    for k in a1:
        # The update itself: AdamW's first step is ~lr * sign(g), so a gradient element within
        # round-off of zero may flip; every other element must agree to 1e-4 of the step.
        d1, d2, d3 = a1[k] - i1[k], a2[k] - i1[k], a3[k] - i1[k]
        step = d1.abs().max()
        assert step > 1e-4, k  # it moved
        for other in (d2, d3):
            close = (d1 - other).abs() <= 1e-4 * step
            assert close.float().mean() >= 0.999, (k, float(close.float().mean()))
    for key in ("actor/pg_loss", "actor/ppo_kl", "actor/entropy", "actor/kl", "actor/grad_norm"):
        assert abs(m1[key] - m2[key]) <= 1e-5 * max(1.0, abs(m1[key])), (key, m1[key], m2[key])
        assert abs(m1[key] - m3[key]) <= 1e-5 * max(1.0, abs(m1[key])), (key, m1[key], m3[key])
