"""A training batch as tensors: collated from trajectory groups on rank 0, broadcast to
the other ranks as plain tensors (no pickled objects cross ranks), sharded by rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist


@dataclass
class Batch:
    """Row b = one sample: prompt + response tokens, right-padded to L.

    `response_mask[b, t]` is 1 where input_ids[b, t] is a response token, and every
    per-token tensor is aligned with it: `behaviour_logprobs[b, t]` is the rollout engine's
    log-prob of input_ids[b, t].
    """

    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long
    response_mask: torch.Tensor  # [B, L] float
    behaviour_logprobs: torch.Tensor  # [B, L] float
    rewards: torch.Tensor  # [B] float
    group_index: torch.Tensor  # [B] long, samples of one prompt share it
    versions: torch.Tensor  # [B] long, adapter version that generated the sample

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def rows(self, idx: torch.Tensor | slice) -> Batch:
        return Batch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def shard(self, rank: int, world: int) -> Batch:
        """Rows rank, rank + world, ... (all ranks see whole groups' advantages beforehand)."""
        return self.rows(torch.arange(rank, self.size, world))


def collate(groups: Sequence, pad_id: int = 0) -> Batch:
    """Groups with .prompt_token_ids and .samples (response_token_ids, logprobs, reward,
    adapter_version) -> Batch."""
    rows = []
    for gi, g in enumerate(groups):
        prompt = list(g.prompt_token_ids)
        for s in g.samples:
            rows.append((gi, prompt, list(s.response_token_ids), list(s.logprobs), float(s.reward),
                         int(s.adapter_version)))
    length = max(len(p) + len(r) for _, p, r, *_ in rows)
    n = len(rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    resp = torch.zeros((n, length))
    blp = torch.zeros((n, length))
    for b, (_, p, r, lp, _, _) in enumerate(rows):
        k = len(p) + len(r)
        input_ids[b, :k] = torch.tensor(p + r)
        attention[b, :k] = 1
        resp[b, len(p):k] = 1
        blp[b, len(p):k] = torch.tensor(lp)
    return Batch(input_ids, attention, resp, blp,
                 torch.tensor([r[4] for r in rows]), torch.tensor([r[0] for r in rows]),
                 torch.tensor([r[5] for r in rows]))


_DTYPES = [torch.long, torch.long, torch.float32, torch.float32, torch.float32, torch.long, torch.long]


def comm_device() -> torch.device:
    """Where collectives run: the local GPU under nccl, the CPU under gloo."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast(batch: Batch | None, src: int = 0) -> Batch | None:
    """Rank `src` sends `batch`; every rank returns it (on the CPU). None from `src` (it was
    told to stop) reaches every rank as None. A no-op without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return batch
    dev = comm_device()
    sending = dist.get_rank() == src
    shape = torch.tensor(list(batch.input_ids.shape) if sending and batch is not None else [0, 0], device=dev)
    dist.broadcast(shape, src)
    n, length = int(shape[0]), int(shape[1])
    if n == 0:
        return None
    out = []
    for f, dtype in zip(fields(Batch), _DTYPES, strict=True):
        per_token = f.name in ("input_ids", "attention_mask", "response_mask", "behaviour_logprobs")
        t = getattr(batch, f.name).to(dev, dtype) if batch is not None else \
            torch.zeros((n, length) if per_token else (n,), dtype=dtype, device=dev)
        t = t.contiguous()
        dist.broadcast(t, src)
        out.append(t.cpu())
    return Batch(*out)
