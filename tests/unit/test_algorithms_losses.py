"""Policy and value losses: PPO clip (clip-higher, dual-clip), truncated importance weights,
KL estimators, entropy bonus - by hand, against a per-token loop, and their gradients."""

from __future__ import annotations

import math

import pytest
import torch

from services.learner.algorithms import (
    LossInputs,
    kl_estimate,
    kl_reward_penalty,
    loss_agg,
    policy_loss,
    value_loss,
)

LN2 = math.log(2)


def _inputs(ratio, adv, old=-1.0, tis=None, **extra) -> LossInputs:
    """One sequence; logprobs = old + log(ratio), behaviour = old - log(tis weight)."""
    ratio_t = torch.tensor([ratio], dtype=torch.float64)
    old_t = torch.full_like(ratio_t, old)
    tis_t = torch.ones_like(ratio_t) if tis is None else torch.tensor([tis], dtype=torch.float64)
    return LossInputs(
        logprobs=(old_t + ratio_t.log()).requires_grad_(),
        old_logprobs=old_t,
        behaviour_logprobs=old_t - tis_t.log(),
        advantages=torch.tensor([adv], dtype=torch.float64),
        response_mask=torch.ones_like(ratio_t, dtype=torch.bool),
        **extra,
    )


def test_ppo_clip_higher_and_dual_clip_by_hand() -> None:
    # clip_low 0.2, clip_high 0.28, dual_clip_c 3; per token max(-A r, -A clip(r, 0.8, 1.28)):
    #   A=+1 r=1.1 -> max(-1.1, -1.1)  = -1.1   unclipped
    #   A=+1 r=1.5 -> max(-1.5, -1.28) = -1.28  clip-high
    #   A=-1 r=0.5 -> max(0.5, 0.8)    =  0.8   clip-low
    #   A=-1 r=1.2 -> max(1.2, 1.2)    =  1.2   unclipped (1.2 < 1.28)
    #   A=-1 r=5.0 -> max(5.0, 1.28)   =  5.0 -> dual-clip min(5.0, 3*1) = 3
    #   A=+2 r=0.5 -> max(-1.0, -1.6)  = -1.0   unclipped (A > 0 is not clipped below)
    # token-mean: (-1.1 - 1.28 + 0.8 + 1.2 + 3 - 1.0) / 6 = 1.62 / 6 = 0.27
    ratios = [1.1, 1.5, 0.5, 1.2, 5.0, 0.5]
    inputs = _inputs(ratios, [1.0, 1.0, -1.0, -1.0, -1.0, 2.0])
    out = policy_loss(inputs, clip_low=0.2, clip_high=0.28, dual_clip_c=3.0, tis_cap=2.0)
    assert out.loss.item() == pytest.approx(0.27, abs=1e-12)
    m = out.metrics
    assert m["pg_loss"] == pytest.approx(0.27, abs=1e-12)
    assert (m["pg_clipfrac_high"], m["pg_clipfrac_low"], m["dual_clipfrac"]) == (
        1 / 6,
        1 / 6,
        1 / 6,
    )
    assert m["pg_clipfrac"] == pytest.approx(2 / 6, abs=1e-12)
    # ppo_kl = mean(old - new) = -ln(1.1 * 1.5 * 0.5 * 1.2 * 5 * 0.5) / 6 = -ln(2.475) / 6
    assert m["ppo_kl"] == pytest.approx(-math.log(2.475) / 6, abs=1e-12)
    assert (m["tis_mean"], m["tis_clipfrac"], m["behaviour_kl"]) == (1.0, 0.0, 0.0)

    # d loss / d logprob = -A r / 6 where the unclipped term is active, 0 where clipped:
    out.loss.backward()
    expected = torch.tensor([[-1.1, 0.0, 0.0, 1.2, 0.0, -1.0]], dtype=torch.float64) / 6
    torch.testing.assert_close(inputs.logprobs.grad, expected, rtol=0, atol=1e-12)


def test_without_dual_clip_a_negative_advantage_is_unbounded() -> None:
    # A=-1 r=5: max(5, 1.28) = 5 when dual-clip is off.
    out = policy_loss(_inputs([5.0], [-1.0]), dual_clip_c=None)
    assert out.loss.item() == pytest.approx(5.0, abs=1e-12)


def test_truncated_importance_weights_by_hand() -> None:
    # On-policy for the learner (r = 1), A = 1; behaviour vs learner weights
    # exp(old - behaviour) = 0.5, 1.5, 3 -> capped at 2: (0.5, 1.5, 2).
    # pg = -A r w = (-0.5, -1.5, -2), token-mean -4/3; gradient -A r w / 3.
    inputs = _inputs([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], tis=[0.5, 1.5, 3.0])
    out = policy_loss(inputs, tis_cap=2.0)
    assert out.loss.item() == pytest.approx(-4 / 3, abs=1e-12)
    assert out.metrics["tis_mean"] == pytest.approx(4 / 3, abs=1e-12)
    assert out.metrics["tis_clipfrac"] == pytest.approx(1 / 3, abs=1e-12)
    # behaviour_kl = mean(behaviour - old) = -ln(0.5 * 1.5 * 3) / 3 = -ln(2.25) / 3
    assert out.metrics["behaviour_kl"] == pytest.approx(-math.log(2.25) / 3, abs=1e-12)
    out.loss.backward()
    expected = torch.tensor([[-0.5, -1.5, -2.0]], dtype=torch.float64) / 3
    torch.testing.assert_close(inputs.logprobs.grad, expected, rtol=0, atol=1e-12)

    # tis_cap=None turns the correction off: pg = (-1, -1, -1); the metric still shows the
    # uncapped weights, mean (0.5 + 1.5 + 3) / 3 = 5/3.
    off = policy_loss(_inputs([1.0] * 3, [1.0] * 3, tis=[0.5, 1.5, 3.0]), tis_cap=None)
    assert off.loss.item() == pytest.approx(-1.0, abs=1e-12)
    assert off.metrics["tis_mean"] == pytest.approx(5 / 3, abs=1e-12)


def test_on_policy_step_is_the_vanilla_policy_gradient() -> None:
    # logprobs == old == behaviour: r = 1, w = 1, nothing clipped; grad = -A * mask / tokens.
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    adv = torch.randn(3, 5, generator=g)
    logprobs = lp.clone().requires_grad_()
    out = policy_loss(LossInputs(logprobs, lp, lp, adv, mask))
    out.loss.backward()
    torch.testing.assert_close(logprobs.grad, -adv * mask / 8, rtol=0, atol=1e-7)
    assert out.loss.item() == pytest.approx(-(adv * mask).sum().item() / 8, abs=1e-6)


def test_only_the_current_logprobs_receive_gradient() -> None:
    lp = torch.tensor([[-1.0, -2.0]])
    logprobs = (lp + 0.1).requires_grad_()
    others = {k: lp.clone().requires_grad_() for k in ("old", "beh", "ref")}
    adv = torch.tensor([[1.0, -1.0]], requires_grad=True)
    inputs = LossInputs(
        logprobs, others["old"], others["beh"], adv, torch.ones(1, 2), ref_logprobs=others["ref"]
    )
    policy_loss(inputs, kl_coef=0.1).loss.backward()
    assert logprobs.grad is not None
    assert all(t.grad is None for t in (*others.values(), adv))


def test_k3_is_clamped_as_verl_does_and_its_gradient_stays_finite() -> None:
    # x = log pi - log pi_ref. verl: k = clamp(-x, -20, 20); value clamp(e^k - k - 1, -10, 10).
    # At x = -100 the unclamped e^100 overflows float32 (> 3.4e38 past x = -88.7), and the
    # gradient through a value-only clamp was 0 * inf = NaN. Clamped first: value 10, grad 0.
    # At x = 30: k = -20, e^-20 + 20 - 1 = 19.000000002, clamped to 10, grad 0.
    # At x = 0.5: e^-0.5 - 1 + 0.5 = 0.106531; d/dx = 1 - e^-0.5 = 0.393469.
    x = torch.tensor([-100.0, 30.0, 0.5], requires_grad=True)
    k = kl_estimate(x, torch.zeros(3), "k3")
    k.sum().backward()
    torch.testing.assert_close(k.detach(), torch.tensor([10.0, 10.0, math.exp(-0.5) - 0.5]), rtol=0, atol=1e-6)
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 0.0, 1 - math.exp(-0.5)]), rtol=0, atol=1e-6)


def test_abs_and_the_straight_through_estimators() -> None:
    # abs = |x|. "+" variants: the value of k1 / k3 / abs, the gradient of k2 = x^2 / 2 (= x).
    x0 = torch.tensor([LN2, -LN2, -1.5], dtype=torch.float64)  # k3 stays under its clamp (10)
    values = {"abs": x0.abs(), "k1+": x0, "k3+": torch.exp(-x0) - 1 + x0, "abs+": x0.abs()}
    for name, value in values.items():
        x = x0.clone().requires_grad_(True)
        k = kl_estimate(x, torch.zeros_like(x), name)
        k.sum().backward()
        torch.testing.assert_close(k.detach(), value, rtol=0, atol=1e-12, msg=name)
        grad = torch.sign(x0) if name == "abs" else x0
        torch.testing.assert_close(x.grad, grad, rtol=0, atol=1e-12, msg=name)


def test_kl_estimators_by_hand() -> None:
    # x = log pi - log pi_ref = (ln 2, -ln 2, -5)
    # k1 = x; k2 = x^2 / 2; k3 = exp(-x) - 1 + x:
    #   ln 2  -> 0.5 - 1 + 0.693147 = 0.193147;  -ln 2 -> 2 - 1 - 0.693147 = 0.306853
    #   -5    -> e^5 - 6 = 142.41, clamped to 10
    x = torch.tensor([LN2, -LN2, -5.0], dtype=torch.float64)
    ref = torch.zeros_like(x)
    torch.testing.assert_close(kl_estimate(x, ref, "k1"), x, rtol=0, atol=0)
    torch.testing.assert_close(kl_estimate(x, ref, "k2"), x**2 / 2, rtol=0, atol=0)
    expected_k3 = torch.tensor([0.5 - 1 + LN2, 2 - 1 - LN2, 10.0], dtype=torch.float64)
    torch.testing.assert_close(kl_estimate(x, ref, "k3"), expected_k3, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kl_type", ["k1", "k3"])
def test_k1_and_k3_are_unbiased_for_kl(kl_type: str) -> None:
    # Exact expectation over a categorical: sum_i p_i k(log p_i - log q_i) = KL(p || q).
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    exact = (p * (p / q).log()).sum()
    estimate = (p * kl_estimate(p.log(), q.log(), kl_type)).sum()
    torch.testing.assert_close(estimate, exact, rtol=0, atol=1e-12)


def test_kl_loss_and_entropy_bonus_by_hand() -> None:
    # r = 1 and A = 0, so pg = 0. x = (ln 2, -ln 2): k3 = (0.193147, 0.306853), mean 0.25;
    # entropy (1, 3), mean 2. loss = 0.1 * 0.25 - 0.01 * 2 = 0.025 - 0.02 = 0.005
    ref = torch.tensor([[-1.0 - LN2, -1.0 + LN2]], dtype=torch.float64)
    entropy = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    inputs = _inputs([1.0, 1.0], [0.0, 0.0], ref_logprobs=ref, entropy=entropy)
    out = policy_loss(inputs, kl_coef=0.1, kl_type="k3", entropy_coef=0.01)
    assert out.loss.item() == pytest.approx(0.005, abs=1e-12)
    assert (out.metrics["kl"], out.metrics["entropy"]) == (pytest.approx(0.25, abs=1e-12), 2.0)
    # d k3 / dx = 1 - exp(-x): 0.5 at ln 2, -1 at -ln 2; times kl_coef / 2 tokens
    out.loss.backward()
    expected = torch.tensor([[0.5, -1.0]], dtype=torch.float64) * 0.1 / 2
    torch.testing.assert_close(inputs.logprobs.grad, expected, rtol=0, atol=1e-12)


def test_kl_reward_penalty_is_scaled_masked_and_detached() -> None:
    # k1 with coef 0.5: 0.5 * (logp - ref) = 0.5 * (0.4, 1.0), the padded token -> 0
    lp = torch.tensor([[-1.0, -1.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.4, -2.0, -9.0]])
    pen = kl_reward_penalty(lp, ref, torch.tensor([[1, 1, 0]]), kl_coef=0.5)
    torch.testing.assert_close(pen, torch.tensor([[0.2, 0.5, 0.0]]), rtol=0, atol=1e-6)
    assert not pen.requires_grad


def _policy_loss_loop(d: dict[str, torch.Tensor], kw: dict) -> float:
    """Per-token PPO/dual-clip/TIS + k3 KL + entropy with python floats, then seq-mean-token-mean."""
    per_seq = []
    for i in range(d["mask"].shape[0]):
        terms = []
        for t in range(d["mask"].shape[1]):
            if not d["mask"][i, t]:
                continue
            lp, old, beh, a = (float(d[k][i, t]) for k in ("logprobs", "old", "beh", "adv"))
            r = math.exp(lp - old)
            pg = max(-a * r, -a * min(max(r, 1 - kw["clip_low"]), 1 + kw["clip_high"]))
            if a < 0:
                pg = min(pg, -a * kw["dual_clip_c"])
            pg *= min(math.exp(old - beh), kw["tis_cap"])
            x = lp - float(d["ref"][i, t])
            kl = min(math.exp(-x) - 1 + x, 10.0)
            terms.append(pg + kw["kl_coef"] * kl - kw["entropy_coef"] * float(d["ent"][i, t]))
        per_seq.append(sum(terms) / len(terms) if terms else 0.0)
    return sum(per_seq) / len(per_seq)


def test_policy_loss_matches_a_per_token_loop() -> None:
    g = torch.Generator().manual_seed(3)
    shape = (5, 6)
    old = -3 * torch.rand(shape, generator=g, dtype=torch.float64)
    d = {
        "old": old,
        "logprobs": old + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64),
        "beh": old + 0.6 * torch.randn(shape, generator=g, dtype=torch.float64),
        "ref": old + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64),
        "ent": torch.rand(shape, generator=g, dtype=torch.float64),
        "adv": torch.randn(shape, generator=g, dtype=torch.float64),
        "mask": torch.rand(shape, generator=g) < 0.7,
    }
    kw = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip_c": 3.0, "tis_cap": 1.5,
          "kl_coef": 0.05, "entropy_coef": 0.01}  # fmt: skip
    inputs = LossInputs(
        d["logprobs"],
        d["old"],
        d["beh"],
        d["adv"],
        d["mask"],
        ref_logprobs=d["ref"],
        entropy=d["ent"],
    )
    out = policy_loss(inputs, kl_type="k3", agg="seq-mean-token-mean", **kw)
    assert out.metrics["pg_clipfrac"] > 0 and out.metrics["tis_clipfrac"] > 0
    assert out.loss.item() == pytest.approx(_policy_loss_loop(d, kw), abs=1e-10)


def test_padding_may_hold_inf_and_nan() -> None:
    # Positions outside the mask can hold -inf log-probs or nan from the wire; neither
    # the loss nor the gradient may see them.
    mask = torch.tensor([[1, 1, 0]])
    logprobs = torch.tensor([[-1.0, -2.0, -math.inf]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0, math.nan]])
    inputs = LossInputs(logprobs, old, old, torch.tensor([[1.0, -1.0, math.nan]]), mask,
                        ref_logprobs=old, entropy=torch.tensor([[0.5, 0.5, math.nan]]))  # fmt: skip
    out = policy_loss(inputs, kl_coef=0.1, entropy_coef=0.01)
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and all(math.isfinite(v) for v in out.metrics.values())
    assert torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[0, 2] == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_low": 1.0}, "clip_low"),
        ({"dual_clip_c": 1.0}, "dual_clip_c"),
        ({"tis_cap": 0.0}, "tis_cap"),
        ({"kl_coef": 0.1}, "ref_logprobs"),
        ({"entropy_coef": 0.01}, "entropy"),
        ({"kl_type": "k4"}, r"k1, k1\+, k2, k3, k3\+"),
        ({"agg": "sum"}, "token-mean"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        policy_loss(_inputs([1.0], [1.0]), **kwargs)


def test_loss_inputs_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="advantages"):
        LossInputs(
            torch.zeros(2, 3),
            torch.zeros(2, 3),
            torch.zeros(2, 3),
            torch.zeros(2),
            torch.ones(2, 3),
        )


def test_value_loss_by_hand() -> None:
    # clip 0.2:
    #   V=1.0 V_old=0.5 R=1.2: unclipped (1.0-1.2)^2 = 0.04; clipped V=0.7: (0.7-1.2)^2 = 0.25 -> 0.25
    #   V=0.6 V_old=0.5 R=0.0: unclipped 0.36; clipped V=0.6 (inside) 0.36          -> 0.36
    # 0.5 * token-mean = 0.5 * (0.25 + 0.36) / 2 = 0.1525; the clipped term wins on 1 of 2
    values = torch.tensor([[1.0, 0.6]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    returns = torch.tensor([[1.2, 0.0]], dtype=torch.float64)
    out = value_loss(values, old, returns, torch.ones(1, 2))
    assert out.loss.item() == pytest.approx(0.1525, abs=1e-12)
    assert out.metrics["vf_clipfrac"] == 0.5
    # gradient: 0 through the clipped token, 0.5 * 2 * (0.6 - 0) / 2 = 0.3 through the other
    out.loss.backward()
    torch.testing.assert_close(
        values.grad, torch.tensor([[0.0, 0.3]], dtype=torch.float64), rtol=0, atol=1e-12
    )
    unclipped = value_loss(values.detach(), old, returns, torch.ones(1, 2), clip=None)
    assert unclipped.loss.item() == pytest.approx(0.5 * (0.04 + 0.36) / 2, abs=1e-12)


def test_value_loss_uses_the_aggregation_mode() -> None:
    g = torch.Generator().manual_seed(6)
    v, r = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    mask = torch.rand(4, 5, generator=g) < 0.6
    out = value_loss(v, v, r, mask, agg="seq-mean-token-sum")
    expected = 0.5 * loss_agg((v - r) ** 2, mask, "seq-mean-token-sum")
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-6)
