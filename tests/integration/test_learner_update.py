"""The learner's update (issue 4, points 1 and 2)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
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


def test_ppo_critic_update_trains_both_adapters_and_head_and_publishes_the_policy_only(tiny_model):
    """PPO with GAE: the critic is a second LoRA adapter plus a value head on the same base.
    One update moves every parameter of both adapters and the head, no base parameter, and
    the published adapter is exactly the policy's (same keys as without a critic)."""
    from services.learner.batch import collate
    from services.learner.config import AlgoConfig, ModelConfig
    from services.learner.policy import Policy
    from services.learner.trainer import Trainer

    torch.manual_seed(0)
    policy = Policy(ModelConfig(path=str(tiny_model), lora_rank=8, lora_alpha=16), critic=True)
    trainer = Trainer(policy, AlgoConfig(lr=1e-2, mini_batches=2, advantage="gae", lam=0.95, kl_coef=0.01))
    before = {n: p.detach().clone() for n, p in policy.root.named_parameters()}
    batch = collate(synthetic_groups())
    metrics = trainer.step(batch)
    params = dict(policy.root.named_parameters())
    trained = set(policy.trainable_names())
    critic = {n for n in trained if ".critic." in n or n.startswith("value_head.")}
    assert critic and trained - critic and any(n.startswith("value_head.") for n in critic)
    assert {n for n in before if "lora_" in n or n.startswith("value_head.")} == trained
    assert not [n for n in trained if torch.equal(params[n], before[n])]
    assert not [n for n in before if n not in trained and not torch.equal(params[n], before[n])]
    for key in ("actor/pg_loss", "critic/vf_loss", "critic/vf_clipfrac", "critic/grad_norm",
                "critic/explained_var", "critic/returns_mean"):
        assert key in metrics and metrics[key] == metrics[key], key
    assert metrics["critic/grad_norm"] > 0 and metrics["actor/grad_norm"] > 0
    # Values are causal and shifted: V at t reads only tokens < t, so changing the last
    # token of every row leaves every value unchanged; position 0 is 0.
    with torch.no_grad():
        v = policy.values(batch.input_ids, batch.attention_mask)
        ids = batch.input_ids.clone()
        ids[:, -1] = (ids[:, -1] + 1) % 16
        assert torch.equal(v, policy.values(ids, batch.attention_mask))
        assert torch.all(v[:, 0] == 0) and v[:, 1:].abs().sum() > 0
        with policy.reference():  # the critic's own adapter is what V runs through
            v_base = policy.values(batch.input_ids, batch.attention_mask)
        assert (v - v_base).abs().max() > 1e-4
    published = policy.adapter_state_dict()
    plain = Policy(ModelConfig(path=str(tiny_model), lora_rank=8, lora_alpha=16)).adapter_state_dict()
    assert set(published) == set(plain)
    assert all(not torch.equal(published[k], plain[k]) for k in published if "lora_B" in k)


def test_ppo_critic_checkpoint_resumes_the_same_next_update(tiny_model, tmp_path):
    """Checkpoint with a critic (its adapter, head and their optimizer state) and resume:
    the next update equals the uninterrupted one."""
    from services.learner.batch import collate
    from services.learner.checkpoint import load_checkpoint, save_checkpoint
    from services.learner.config import AlgoConfig, ModelConfig
    from services.learner.policy import Policy
    from services.learner.trainer import Trainer

    algo = AlgoConfig(lr=1e-2, advantage="gae", lam=0.95, critic_lr=3e-2)
    mcfg = ModelConfig(path=str(tiny_model), lora_rank=8, lora_alpha=16)
    torch.manual_seed(0)
    a = Policy(mcfg, critic=True)
    ta = Trainer(a, algo)
    ta.step(collate(synthetic_groups(seed=1)))
    save_checkpoint(tmp_path, 1, a, ta.optimizer, {"version": 1}, keep_last=1)
    ta.step(collate(synthetic_groups(seed=2)))
    torch.manual_seed(123)  # a different fresh init: the checkpoint must overwrite all of it
    b = Policy(mcfg, critic=True)
    tb = Trainer(b, algo)
    load_checkpoint(tmp_path / "checkpoints" / "step-000001", b, tb.optimizer)
    tb.step(collate(synthetic_groups(seed=2)))
    pa, pb = dict(a.root.named_parameters()), dict(b.root.named_parameters())
    for n in a.trainable_names():
        assert torch.allclose(pa[n], pb[n], atol=1e-6, rtol=0), n


def _run(model, out, nproc: int, micro: int = 64, advantage: str = "grpo") -> tuple[dict, dict, dict, dict]:
    args = [str(model), str(out), str(micro), advantage]

    def cmd() -> list[str]:
        if nproc == 1:
            return [sys.executable, "-m", "tests.support.fsdp_step", *args]
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}", "-m", "tests.support.fsdp_step", *args]

    r = subprocess.run(cmd(), capture_output=True, text=True, timeout=300)
    if nproc > 1 and r.returncode != 0 and "terminate called without an active exception" in r.stderr:
        # Seen once in CI (2 cores, loaded): one torchrun rank aborted by a C++ thread of gloo right
        # after loading the model, before any collective of ours and with no Python traceback.
        # The step is deterministic, so one more run checks the same thing; a second abort fails.
        warnings.warn(f"torchrun rank aborted (gloo), running once more: {r.stderr[-500:]}", stacklevel=1)
        r = subprocess.run(cmd(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return (json.loads((out / "metrics.json").read_text()), load_file(str(out / "adapter.safetensors")),
            load_file(str(out / "initial.safetensors")), load_file(str(out / "grads.safetensors")))


@pytest.mark.parametrize("advantage", ["grpo", "gae"])
def test_two_ranks_equal_one_rank_and_micro_batches_do_not_matter(tiny_model, tmp_path, advantage):
    """Same batch, same starting adapter: 1 rank, 2 FSDP ranks on gloo, and 1 rank in
    micro-batches of 3 give the same loss, gradients and update (gae: the critic's too)."""
    m1, a1, i1, g1 = _run(tiny_model, tmp_path / "r1", 1, advantage=advantage)
    m2, a2, i2, g2 = _run(tiny_model, tmp_path / "r2", 2, advantage=advantage)
    m3, a3, _, g3 = _run(tiny_model, tmp_path / "r1-micro3", 1, micro=3, advantage=advantage)
    if advantage == "gae":
        assert any(k.startswith("value_head.") for k in a1) and any(".critic." in k for k in g1)
    assert set(a1) == set(a2) == set(a3) and set(g1) == set(g2) == set(g3)
    assert all(torch.equal(i1[k], i2[k]) for k in i1)  # same start
    # The critic's fresh adapter starts with B = 0 (peft), so its A has no gradient on the
    # first optimizer step: exactly zero everywhere, and it does not move.
    still = {k for k in g1 if ".critic." in k and "lora_A" in k}
    assert (still and advantage == "gae") or (not still and advantage == "grpo")
    for k in still:
        assert not g1[k].any() and not g2[k].any() and not g3[k].any(), k
        assert torch.equal(a1[k], i1[k]) and torch.equal(a2[k], i1[k]), k
    for k in set(g1) - still:
        # fp32: gloo sums the ranks' gradients in another order than one process, ~1e-7 relative.
        scale = g1[k].abs().max()
        assert scale > 0, k
        assert (g1[k] - g2[k]).abs().max() <= 1e-5 * scale, (k, float((g1[k] - g2[k]).abs().max() / scale))
        assert (g1[k] - g3[k]).abs().max() <= 1e-5 * scale, (k, float((g1[k] - g3[k]).abs().max() / scale))
    for k in set(a1) - still:
        # The update itself: AdamW's first step is ~lr * sign(g), so a gradient element within
        # round-off of zero may flip; every other element must agree to 1e-4 of the step.
        d1, d2, d3 = a1[k] - i1[k], a2[k] - i1[k], a3[k] - i1[k]
        step = d1.abs().max()
        assert step > 1e-4, k  # it moved
        for other in (d2, d3):
            close = (d1 - other).abs() <= 1e-4 * step
            assert close.float().mean() >= 0.999, (k, float(close.float().mean()))
    keys = ["actor/pg_loss", "actor/ppo_kl", "actor/entropy", "actor/kl", "actor/grad_norm"]
    if advantage == "gae":
        keys += ["critic/vf_loss", "critic/grad_norm", "critic/explained_var"]
    for key in keys:
        assert abs(m1[key] - m2[key]) <= 1e-5 * max(1.0, abs(m1[key])), (key, m1[key], m2[key])
        assert abs(m1[key] - m3[key]) <= 1e-5 * max(1.0, abs(m1[key])), (key, m1[key], m3[key])


def test_one_optimizer_step_reuses_the_updates_own_logprobs_as_old(tiny_model):
    """With one optimizer step per batch the old log-probs are the update's own, detached: the
    step skips their forward and ends exactly where the step with that forward ends."""
    from services.learner.batch import collate
    from services.learner.config import AlgoConfig, ModelConfig
    from services.learner.policy import Policy
    from services.learner.trainer import Trainer

    batch = collate(synthetic_groups())
    ends, calls = [], []
    for reuse in (True, False):
        torch.manual_seed(0)
        policy = Policy(ModelConfig(path=str(tiny_model), lora_rank=8, lora_alpha=16))
        trainer = Trainer(policy, AlgoConfig(lr=1e-2, kl_coef=0.0, log_kl=False))
        assert trainer.reuse_old_logprobs  # one epoch, one mini-batch
        trainer.reuse_old_logprobs = reuse
        forward = policy.token_logprobs
        n = [0]

        def counted(*a, _f=forward, _n=n, **kw):
            _n[0] += 1
            return _f(*a, **kw)

        policy.token_logprobs = counted
        for _ in range(2):  # the second step starts from moved parameters
            metrics = trainer.step(batch)
        ends.append(({k: v.detach().clone() for k, v in policy.model.named_parameters() if "lora_" in k},
                     metrics["actor/pg_loss"]))
        calls.append(n[0])
    (p_reuse, loss_reuse), (p_fwd, loss_fwd) = ends
    assert calls[0] < calls[1]  # the forward for old log-probs is gone
    assert loss_reuse == pytest.approx(loss_fwd, abs=1e-6)
    for k in p_reuse:
        torch.testing.assert_close(p_reuse[k], p_fwd[k], rtol=1e-5, atol=1e-6)


def test_kl_to_the_base_is_measured_every_nth_step_when_it_is_only_a_metric(tiny_model):
    from services.learner.batch import collate
    from services.learner.config import AlgoConfig, ModelConfig
    from services.learner.policy import Policy
    from services.learner.trainer import Trainer

    batch = collate(synthetic_groups())
    policy = Policy(ModelConfig(path=str(tiny_model), lora_rank=8, lora_alpha=16))
    trainer = Trainer(policy, AlgoConfig(lr=1e-2, kl_coef=0.0, log_kl_every=3))
    assert ["actor/kl" in trainer.step(batch) for _ in range(7)] == [True, False, False, True, False, False, True]
    with_kl = Trainer(policy, AlgoConfig(lr=1e-2, kl_coef=0.01, log_kl_every=3))  # in the loss: every step
    assert all("actor/kl" in with_kl.step(batch) for _ in range(3))


def test_adaptive_kl_in_the_reward_moves_its_coefficient_by_verls_rule(tiny_model):
    """kl_ctrl = adaptive (verl's algorithm.kl_ctrl.type=adaptive): each step reports the batch's
    mean per-sequence KL and the coefficient it used; the next step's coefficient is
    coef * (1 + clip(kl / target - 1, -0.2, 0.2) * sequences / horizon)."""
    from services.learner.batch import collate
    from services.learner.config import AlgoConfig, ModelConfig
    from services.learner.policy import Policy
    from services.learner.trainer import Trainer

    torch.manual_seed(0)
    batch = collate(synthetic_groups())
    policy = Policy(ModelConfig(path=str(tiny_model), lora_rank=8, lora_alpha=16))
    cfg = AlgoConfig(lr=5e-2, kl_in_reward=True, kl_coef=0.05, kl_type="k1", kl_ctrl="adaptive",
                     kl_target=1e-6, kl_horizon=100)
    trainer = Trainer(policy, cfg)
    first = trainer.step(batch)
    assert first["actor/reward_kl_penalty_coeff"] == 0.05
    assert first["actor/reward_kl_penalty"] == pytest.approx(0.0, abs=1e-6)  # the adapter starts as the base
    for _ in range(3):
        m = trainer.step(batch)
    coef, kl = m["actor/reward_kl_penalty_coeff"], m["actor/reward_kl_penalty"]
    assert kl > 2e-6  # the policy moved away from the base: above target, so the coefficient rises
    error = min(max(kl / 1e-6 - 1, -0.2), 0.2)
    assert trainer.kl_coef_now == pytest.approx(coef * (1 + error * batch.size / 100), rel=1e-9)
    assert trainer.kl_coef_now > coef > 0.05 * 0.9
    fixed = Trainer(policy, cfg.model_copy(update={"kl_ctrl": "fixed"}))
    fixed.step(batch)
    assert fixed.kl_coef_now == 0.05
