"""`logprobs_from_logits`: the learner's token log-probs and entropy without a kept
log-softmax copy, against the textbook log_softmax formulas."""

from __future__ import annotations

import math

import pytest
import torch

from services.learner.policy import logprobs_from_logits


def _reference(logits, ids, temperature):
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, -1)
    tok = torch.gather(logp, -1, ids[:, 1:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    pad = torch.zeros_like(tok[:, :1])
    return torch.cat([pad, tok], 1), torch.cat([pad, ent], 1)


def test_hand_worked_two_token_vocabulary():
    # logits (0, ln 3) at position 0: p = (1/4, 3/4); token 1 was drawn at position 1.
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 5.0]]])
    lp, ent = logprobs_from_logits(logits, torch.tensor([[0, 1]]), with_entropy=True)
    assert lp[0, 0] == 0 and ent[0, 0] == 0  # position 0 has no prefix
    assert lp[0, 1].item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert ent[0, 1].item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_log_softmax_values_and_gradients(temperature, dtype):
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(3, 7, 50, generator=g) * 4).to(dtype)
    ids = torch.randint(0, 50, (3, 7), generator=g)
    a = base.clone().float().requires_grad_(True) if dtype == torch.float32 else base.clone().requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    lp, ent = logprobs_from_logits(a, ids, temperature, with_entropy=True, entropy_grad=True)
    rlp, rent = _reference(b, ids, temperature)
    assert torch.allclose(lp, rlp, atol=1e-5) and torch.allclose(ent, rent, atol=1e-4)
    w = torch.randn(3, 7, generator=g)
    (lp * w + ent * w.flip(0)).sum().backward()
    (rlp * w + rent * w.flip(0)).sum().backward()
    assert torch.allclose(a.grad.float(), b.grad.float(), atol=1e-4)


def test_entropy_is_a_plain_metric_unless_asked_for_its_gradient():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    ids = torch.randint(0, 11, (2, 5))
    lp, ent = logprobs_from_logits(logits, ids, with_entropy=True)
    assert lp.requires_grad and not ent.requires_grad
    _, ent = logprobs_from_logits(logits, ids, with_entropy=True, entropy_grad=True)
    assert ent.requires_grad
