"""Reducing a [B, T] per-token loss to a scalar: verl's `loss_agg_mode`s.

Micro-batching. Each mode is a sum over tokens or sequences divided by a normaliser. If the
trainer passes the normaliser of the whole (global) batch - `global_tokens` for token-mean,
`global_seqs` for the seq-mean modes, and a constant `max_len` for seq-mean-token-sum-norm -
then the per-micro-batch losses sum exactly to the full-batch loss, and so do their
gradients, however the batch is split or padded. Without them, each call normalises by its
own micro-batch (verl's behaviour), which weighs micro-batches unequally.

Under data parallelism with gradient *averaging* across `world` ranks, pass the normalisers
of the global batch divided by `world` (or scale the loss by `world`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from .registry import Registry

AggMode = Literal[
    "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"
]
Normaliser = float | Tensor

AggFn = Callable[[Tensor, Tensor, Normaliser | None, Normaliser | None, int | None], Tensor]
AGG_MODES: Registry[AggFn] = Registry("loss aggregation mode")


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of `x` over the positions where `mask` is true (0 when the mask is empty)."""
    mask = mask.bool()
    return torch.where(mask, x, 0).sum() / mask.sum().clamp(min=1)


def _seq_sums(loss_mat: Tensor, mask: Tensor) -> Tensor:
    # `where`, not `loss * mask`: a padded position may hold inf/nan (e.g. -inf log-probs).
    return torch.where(mask, loss_mat, 0).sum(dim=-1)


def _num_seqs(mask: Tensor, global_seqs: Normaliser | None) -> Normaliser:
    return max(mask.shape[0], 1) if global_seqs is None else global_seqs


@AGG_MODES.register("token-mean")
def _token_mean(
    loss_mat: Tensor,
    mask: Tensor,
    global_tokens: Normaliser | None,
    global_seqs: Normaliser | None,
    max_len: int | None,
) -> Tensor:
    """Every token weighs the same (DAPO, Yu et al. 2025, "token-level policy gradient")."""
    tokens = mask.sum().clamp(min=1) if global_tokens is None else global_tokens
    return _seq_sums(loss_mat, mask).sum() / tokens


@AGG_MODES.register("token-sum")
def _token_sum(
    loss_mat: Tensor,
    mask: Tensor,
    global_tokens: Normaliser | None,
    global_seqs: Normaliser | None,
    max_len: int | None,
) -> Tensor:
    """The sum over every response token, no normaliser (verl's token-sum): the gradient grows
    with the batch's token count, so the learning rate is per token."""
    return _seq_sums(loss_mat, mask).sum()


@AGG_MODES.register("seq-mean-token-sum")
def _seq_mean_token_sum(
    loss_mat: Tensor,
    mask: Tensor,
    global_tokens: Normaliser | None,
    global_seqs: Normaliser | None,
    max_len: int | None,
) -> Tensor:
    """Sum over a sequence's tokens, mean over sequences: long answers weigh more."""
    return _seq_sums(loss_mat, mask).sum() / _num_seqs(mask, global_seqs)


@AGG_MODES.register("seq-mean-token-mean")
def _seq_mean_token_mean(
    loss_mat: Tensor,
    mask: Tensor,
    global_tokens: Normaliser | None,
    global_seqs: Normaliser | None,
    max_len: int | None,
) -> Tensor:
    """Mean over a sequence's tokens, then over sequences: GRPO as written (Shao et al.
    2024), which Liu et al. 2025 show biases toward long wrong answers. An empty sequence
    contributes 0 but still counts in the number of sequences."""
    per_seq = _seq_sums(loss_mat, mask) / mask.sum(dim=-1).clamp(min=1)
    return per_seq.sum() / _num_seqs(mask, global_seqs)


@AGG_MODES.register("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(
    loss_mat: Tensor,
    mask: Tensor,
    global_tokens: Normaliser | None,
    global_seqs: Normaliser | None,
    max_len: int | None,
) -> Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): a sequence's token
    sum divided by a constant (the generation budget), then the mean over sequences, so no
    length-dependent normaliser biases the gradient. verl (0.9.1) divides the same way: by
    the number of sequences times the constant."""
    if global_seqs is not None and max_len is None:
        raise ValueError("seq-mean-token-sum-norm with global_seqs needs a constant max_len")
    length = mask.shape[-1] if max_len is None else max_len
    return _seq_sums(loss_mat, mask).sum() / (_num_seqs(mask, global_seqs) * length)


def loss_agg(
    loss_mat: Tensor,
    response_mask: Tensor,
    mode: AggMode | str = "token-mean",
    *,
    global_tokens: Normaliser | None = None,
    global_seqs: Normaliser | None = None,
    max_len: int | None = None,
) -> Tensor:
    """Aggregate a per-token loss [B, T] over `response_mask` [B, T] into a scalar.

    Args:
        mode: one of `AGG_MODES.names()`.
        global_tokens: response tokens in the whole batch (token-mean); default: this one's.
        global_seqs: sequences in the whole batch (seq-mean modes); default: B.
        max_len: the constant of seq-mean-token-sum-norm (the generation budget);
            default: T. Required together with `global_seqs`, since micro-batches may be
            padded to different lengths.
    """
    if loss_mat.shape != response_mask.shape or loss_mat.dim() != 2:
        raise ValueError(
            f"loss {tuple(loss_mat.shape)} and mask {tuple(response_mask.shape)} must be [B, T]"
        )
    fn = AGG_MODES.get(mode)
    return fn(loss_mat, response_mask.bool(), global_tokens, global_seqs, max_len)
