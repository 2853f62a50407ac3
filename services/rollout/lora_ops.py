"""Faster LoRA ops for vLLM's CPU punica wrapper, installed into every vLLM process as a plugin.

vLLM's stock CPU ops (`vllm/lora/ops/torch_ops`, called by `PunicaWrapperCPU`) index the stacked
LoRA weights per token (`lora_weights[token_indices]`, a copy per token) and einsum over them once
per slice. Here the rows are grouped by adapter once per mapping change (`update_metadata`), so
each adapter's weights are read once for its rows, in the weights' own dtype:
- one adapter on every row (training): one shrink matmul over all slices and one expand per
  slice (or one block-diagonal expand, BLOCK_DIAG_MIN_SLICES), or the C kernels where they are
  register-blocked for the dtype (`_one_by_kernel`);
- mixed adapters: the segmented C kernels of cpu_kernels.py (lora_cpu.c); without them (no C
  compiler, LORALOOP_CPU_KERNELS=0, float16) rows gathered into one padded group per adapter,
  batched matmuls over the groups, added back with one `index_add_`.
Rows with no adapter (index -1) are skipped; the stock ops apply the last slot's adapter to them.
The measurements behind these choices: docs/benchmarks-notes.md.

Install: the `vllm.general_plugins` entry point `register`, which vLLM calls in each process it
starts (front end, engine core, workers) before the model is built. `LORALOOP_FAST_LORA_OPS=0`
leaves the stock ops in place. Numerics: the stock ops shrink in float32 and round to the
output dtype before the expand; a bf16 matmul accumulates in float32 and rounds once, so the two
differ only in summation order (tests/integration/test_lora_ops.py compares them in bf16).
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from services.rollout import cpu_kernels

if TYPE_CHECKING:
    import torch

# Under vLLM's logger: in the engine processes only vLLM's handlers are configured.
log = logging.getLogger("vllm.loraloop.lora_ops")

ENV_SWITCH = "LORALOOP_FAST_LORA_OPS"
WRAPPER_QUALNAME = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"

# What is replaced on PunicaWrapperCPU, with the parameters it has in vLLM 0.32. Any difference
# (a vLLM upgrade) keeps the stock ops: see check_vllm_lora_api.
EXPECTED_PARAMS: dict[str, tuple[str, ...]] = {
    "update_metadata": ("self", "mapping", "lora_index_to_id", "max_loras", "vocab_size", "kwargs"),
    "add_lora_linear": ("self", "y", "x", "lora_a_stacked", "lora_b_stacked", "scale",
                        "output_slices", "buffer", "kwargs"),
    "add_lora_logits": ("self", "y", "x", "lora_a_stacked", "lora_b_stacked", "scale", "buffer",
                        "kwargs"),
}
# Read from PunicaWrapperBase: per-token and per-sampled-row adapter slot (-1 = none).
EXPECTED_PROPERTIES = ("token_lora_indices", "sampler_indices")

_PATCHED_FLAG = "_loraloop_fast_ops"
_stock: dict[str, Any] = {}
_announced = False


class LoraOpsMismatch(RuntimeError):
    """The installed vLLM is not the one these ops were written against."""


# ---------------------------------------------------------------- grouping and weights (pure)


@dataclass(frozen=True)
class TokenGroups:
    """Rows of one step grouped by adapter slot; computed once per step, used by every layer."""

    n_rows: int
    single: int  # the slot every row uses, or -1 (mixed, or some rows without adapter)
    any_lora: bool
    # Rows with an adapter sorted by slot, and (slot, start, end) ranges of `order` (one adapter:
    # one segment of every row).
    order: torch.Tensor | None = None
    segments: tuple[tuple[int, int, int], ...] = ()
    # Mixed and balanced: one padded group per slot in slot_lo .. slot_lo + n_groups - 1 (empty
    # for unused slots in between, so the groups' weights are a slice of the stacked weights).
    slot_lo: int = 0
    n_groups: int = 0
    gather: torch.Tensor | None = None  # (n_groups * width,) row of each padded group position
    # (n_groups, width, 1) 1.0 for real rows, 0.0 for padding; None when there is no padding
    # (every used slot has `width` rows, e.g. the same number of samples per adapter)
    mask: torch.Tensor | None = None
    width: int = 0  # rows per padded group
    # `segments` as an int64 (n_segments, 3) tensor, for the C kernels (cpu_kernels.py)
    seg_table: torch.Tensor | None = None
    # (rows, seg_table) data pointers and the number of segments, for the C kernels' calls
    kernel_ptrs: tuple[int, int, int] | None = field(default=None, compare=False, repr=False)
    # The per-row slots and device these groups were made from (group_tokens' reuse check).
    slots: list[int] | None = field(default=None, compare=False, repr=False)
    device: Any = field(default=None, compare=False, repr=False)


# Padded groups cost n_groups * width rows of matmul; past this many times the real rows (e.g. a
# long prefill chunk for one adapter beside decode tokens of others), one matmul per group instead.
MAX_PADDING = 2.0


def group_tokens(indices: torch.Tensor, previous: TokenGroups | None = None) -> TokenGroups:
    """Group rows by adapter slot (`indices[i]`, -1 = no adapter). One host sync per call.
    `previous` (the last step's groups) is returned as is when the mapping has not changed: in
    decode, step after step, it does not, and regrouping is a Python loop over the rows."""
    slots = indices.tolist()
    if previous is not None and previous.slots == slots and previous.device == indices.device:
        return previous
    g = _group_slots(slots, indices.device)
    return replace(g, slots=slots, device=indices.device, kernel_ptrs=_kernel_ptrs(g))


def _kernel_ptrs(g: TokenGroups) -> tuple[int, int, int] | None:
    """What a kernel call needs of the groups: rows' and segments' data pointers, segment count."""
    return None if g.seg_table is None else (g.order.data_ptr(), g.seg_table.data_ptr(), g.seg_table.size(0))


def _group_slots(slots: list[int], device) -> TokenGroups:
    import torch

    n = len(slots)
    used = sorted({s for s in slots if s >= 0})
    if not used:
        return TokenGroups(n, -1, False)
    if len(used) == 1 and -1 not in slots:  # one segment of every row, for the C kernels
        return TokenGroups(n, used[0], True, torch.arange(n, device=device), ((used[0], 0, n),),
                           seg_table=torch.tensor([[used[0], 0, n]], dtype=torch.long, device=device))
    lo, hi = used[0], used[-1]
    rows: list[list[int]] = [[] for _ in range(hi - lo + 1)]
    for i, s in enumerate(slots):
        if s >= 0:
            rows[s - lo].append(i)
    order = [i for r in rows for i in r]
    segments, start = [], 0
    for g, r in enumerate(rows):
        if r:
            segments.append((lo + g, start, start + len(r)))
            start += len(r)
    order_t = torch.tensor(order, device=device)
    seg_table = torch.tensor(segments, dtype=torch.long, device=device)
    width = max(len(r) for r in rows)
    if len(rows) * width > MAX_PADDING * len(order):
        return TokenGroups(n, -1, True, order_t, tuple(segments), seg_table=seg_table)
    gather = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, 1)
    for g, r in enumerate(rows):
        gather[g, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[g, : len(r)] = 1.0
    padded = len(rows) * width != len(order)
    return TokenGroups(n, -1, True, order_t, tuple(segments), lo, len(rows), gather.view(-1).to(device),
                       mask.to(device) if padded else None, width, seg_table)


@dataclass
class FusedLora:
    """One LoRA layer's stacked weights laid out for the fast ops, in the weights' own dtype."""

    a_t: torch.Tensor  # (slots, in, n_slices * rank): all slices' A, transposed
    b_t: tuple[torch.Tensor, ...]  # per slice (slots, rank, out_i): B transposed (a view)
    rank: int
    versions: tuple[int, ...]  # _version of the source tensors when this was built
    sources: tuple[torch.Tensor, ...]
    dense_a: torch.Tensor | None = None  # contiguous copies, made on first use: see dense_weights
    dense_b: tuple[torch.Tensor, ...] | None = None
    # (slots, n_slices * rank, sum(out_i)): every slice's B on one block diagonal (a copy), for
    # layers with many slices (qkv), where one expand matmul beats one per small slice
    block_diag: torch.Tensor | None = None
    # (slot, output_slices) -> views used by one-adapter steps, so no per-call slicing
    slot_views: dict = field(default_factory=dict)
    layout: tuple | None = None  # adapter id in each slot when built (vLLM's lora_index_to_id)
    a_copied: bool = True  # a_t is a copy (else a view of the one source)
    # mixed-batch output buffers, reused per shape; the C kernels' bound call per output slices
    buffers: dict = field(default_factory=dict)

    @property
    def slices(self) -> tuple[int, ...]:
        return tuple(b.size(2) for b in self.b_t)

    def scratch(self, key: tuple, shape: tuple[int, ...], dtype) -> torch.Tensor:
        t = self.buffers.get(key)
        if t is None or t.dtype != dtype:
            import torch

            t = self.buffers[key] = torch.empty(shape, dtype=dtype, device=self.a_t.device)
        return t


# Slices per layer from which a 16-bit B is expanded through one block-diagonal matmul (qkv: 3):
# one matmul beats one per small slice; gate_up's 2 large slices gain nothing and would read twice
# the bytes; float32 keeps the per-slice matmuls. Figures: docs/benchmarks-notes.md.
BLOCK_DIAG_MIN_SLICES = 3


def fuse_lora_weights(a_stacked: tuple[torch.Tensor, ...], b_stacked: tuple[torch.Tensor, ...],
                      cached: FusedLora | None = None, layout: tuple | None = None) -> FusedLora:
    """A of all slices concatenated (a copy only for several slices), refreshed when vLLM writes an
    adapter into a slot (the tensors' _version changes): only the slots whose adapter id changed in
    `layout` (vLLM's slot -> adapter id, updated with each write) are copied again, so loading one
    adapter does not copy every slot; a write that no layout change explains rebuilds everything.

    Weights stay in vLLM's dtype (the model's): a bf16 shrink accumulates in float32 inside the
    matmul and rounds once to bf16, where vLLM's stock ops round their float32 shrink output to
    bf16 before the expand, so only the summation order differs."""
    import torch

    sources = (*a_stacked, *b_stacked)
    versions = tuple(t._version for t in sources)
    if cached is not None and all(s is t for s, t in zip(cached.sources, sources, strict=True)):
        if cached.versions == versions:
            return cached
        if layout is not None and cached.layout is not None and len(layout) == len(cached.layout):
            changed = [i for i, (new, old) in enumerate(zip(layout, cached.layout, strict=True)) if new != old]
            if changed and max(changed) < cached.a_t.size(0):
                _refresh_slots(cached, a_stacked, changed)
                cached.versions, cached.layout = versions, layout
                return cached
    a = [t[:, 0] for t in a_stacked]  # (slots, rank, in)
    a_cat = a[0] if len(a) == 1 else torch.cat(a, dim=1)
    b_t = tuple(t[:, 0].transpose(1, 2) for t in b_stacked)
    w = FusedLora(a_cat.transpose(1, 2), b_t, a_stacked[0].size(2), versions, sources, layout=layout,
                  a_copied=len(a) > 1)
    if len(b_t) >= BLOCK_DIAG_MIN_SLICES and b_t[0].dtype in (torch.bfloat16, torch.float16):
        slots, r = b_t[0].size(0), w.rank
        w.block_diag = torch.zeros(slots, r * len(b_t), sum(w.slices), dtype=b_t[0].dtype,
                                   device=b_t[0].device)
        _fill_block_diag(w, range(slots))
    return w


def _fill_block_diag(w: FusedLora, slots) -> None:
    r, off = w.rank, 0
    for i, b in enumerate(w.b_t):
        size = b.size(2)
        for s in slots:
            w.block_diag[s, i * r: (i + 1) * r, off: off + size].copy_(b[s])
        off += size


def _refresh_slots(w: FusedLora, a_stacked: tuple[torch.Tensor, ...], slots: list[int]) -> None:
    """Copy the new contents of `slots` into w's own copies (a_t is a view of the source itself
    for one slice; b_t always is; slot_views are views of those)."""
    import torch

    for i in slots:
        if w.a_copied:
            a_i = [t[i, 0] for t in a_stacked]
            w.a_t[i].copy_((a_i[0] if len(a_i) == 1 else torch.cat(a_i, dim=0)).t())
        if w.dense_a is not None:
            w.dense_a[i].copy_(w.a_t[i])
        if w.dense_b is not None:
            for d, b in zip(w.dense_b, w.b_t, strict=True):
                d[i].copy_(b[i])
    if w.block_diag is not None:
        _fill_block_diag(w, slots)


def dense_weights(w: FusedLora) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Contiguous copies of a_t and b_t, made on the first batch that needs them: torch's CPU bmm
    is slower on transposed views, while mm is not, so one-adapter steps on the torch path use
    the views (the C kernels read dense_b)."""
    if w.dense_a is None:
        w.dense_a = w.a_t.contiguous()
    return w.dense_a, dense_b(w)


def dense_b(w: FusedLora) -> tuple[torch.Tensor, ...]:
    """Contiguous (slots, rank, out) copies of B per slice: the C expand reads rows of them."""
    if w.dense_b is None:
        w.dense_b = tuple(b.contiguous() for b in w.b_t)
    return w.dense_b


def _slot_views(w: FusedLora, slot: int, output_slices: tuple[int, ...]):
    if w.block_diag is not None and output_slices == w.slices:
        return w.a_t[slot], None, w.block_diag[slot]
    pieces, off = [], 0
    for i, size in enumerate(output_slices):
        pieces.append((slice(off, off + size), slice(i * w.rank, (i + 1) * w.rank),
                       w.b_t[i][slot, :, :size]))
        off += size
    return w.a_t[slot], tuple(pieces), None


def lora_linear(y: torch.Tensor, x: torch.Tensor, w: FusedLora, scale: float,
                output_slices: tuple[int, ...], groups: TokenGroups) -> None:
    """y[i, slice_k] += scale * x[i] @ A_k[slot_i]^T @ B_k[slot_i]^T for rows with slot_i >= 0."""
    import torch

    if not groups.any_lora:
        return
    xw = x if x.dtype == w.a_t.dtype else x.to(w.a_t.dtype)
    r = w.rank
    if groups.single >= 0:
        if _one_by_kernel(y) and _kernel_lora_linear(y, xw, w, scale, output_slices, groups):
            return
        views = w.slot_views.get((groups.single, output_slices))
        if views is None:
            views = w.slot_views[(groups.single, output_slices)] = _slot_views(w, groups.single,
                                                                             output_slices)
        a_s, pieces, bd = views
        buf = torch.mm(xw, a_s)
        if scale != 1.0:
            buf.mul_(scale)
        if buf.dtype != y.dtype:
            buf = buf.to(y.dtype)
        if bd is not None:
            y.addmm_(buf, bd)
            return
        for y_cols, buf_cols, b_s in pieces:
            y[:, y_cols].addmm_(buf[:, buf_cols], b_s)
        return
    if groups.seg_table is not None and _kernel_lora_linear(y, xw, w, scale, output_slices, groups):
        return
    if groups.gather is None:
        _lora_linear_per_group(y, xw, w, scale, output_slices, groups)
        return
    a_t, b_t = dense_weights(w)
    lo, hi, width = groups.slot_lo, groups.slot_lo + groups.n_groups, groups.width
    xs = xw.index_select(0, groups.gather).view(groups.n_groups, width, -1)
    buf = torch.bmm(xs, a_t[lo:hi])
    # Padding rows are zeroed here, so what they add back (into row 0) below is exactly zero.
    if groups.mask is not None:
        buf.mul_(groups.mask if scale == 1.0 else groups.mask * scale)
    elif scale != 1.0:
        buf.mul_(scale)
    if buf.dtype != y.dtype:
        buf = buf.to(y.dtype)
    if w.block_diag is not None and output_slices == w.slices:
        out = torch.bmm(buf, w.block_diag[lo:hi])
        y.index_add_(0, groups.gather, out.view(-1, out.size(2)))
        return
    # The slices' outputs go into one reused buffer, then one index_add_: torch.cat of the slices
    # or index_add_ into y's (strided) column slices cost more than the matmuls themselves.
    n = sum(output_slices)
    out = w.scratch(("out", groups.n_groups, width, n), (groups.n_groups, width, n), y.dtype)
    off = 0
    for i, size in enumerate(output_slices):
        if len(output_slices) == 1:  # the buffer is the slice: no copy
            torch.bmm(buf, b_t[0][lo:hi, :, :size], out=out)
            break
        part = w.scratch(("part", i, groups.n_groups, width), (groups.n_groups, width, size), y.dtype)
        torch.bmm(buf[:, :, i * r: (i + 1) * r], b_t[i][lo:hi, :, :size], out=part)
        out[:, :, off: off + size].copy_(part)
        off += size
    y[:, :n].index_add_(0, groups.gather, out.view(-1, n))


# bf16 batches of one adapter above this many rows (prefill) keep torch's matmuls: oneDNN's bf16
# blocking wins on tall x (the crossover was between 384 and 512 rows at 0.5B shapes); float32
# uses the kernels at every size. Figures: docs/benchmarks-notes.md.
ONE_BY_KERNEL_MAX_ROWS_BF16 = 384


def _one_by_kernel(y: torch.Tensor) -> bool:
    """One adapter on every row goes through the C kernels where they have their blocked AVX-512
    items for y's dtype (cpu_kernels.CpuKernels.blocked), which beat oneDNN's matmuls on these
    skinny shapes; else the torch matmuls."""
    import torch

    k = cpu_kernels.loaded()
    return k is not None and y.dtype in k.blocked and (
        y.dtype != torch.bfloat16 or y.size(0) <= ONE_BY_KERNEL_MAX_ROWS_BF16)


def _kernel_lora_linear(y: torch.Tensor, x: torch.Tensor, w: FusedLora, scale: float,
                        output_slices: tuple[int, ...], groups: TokenGroups) -> bool:
    """The layer through the C kernels (cpu_kernels.py), one call: the shrink of all slices into a
    float32 buffer, then each slice's expand straight into y's columns. False (caller falls back to
    torch ops) where they are not loaded or the layout is not theirs. For bf16 the shrink output
    is rounded to bf16, as the stock ops round theirs before the expand. What is the layer's (its
    weights' pointers and strides, the slices' table) is bound once, in w.buffers, which about
    halves the per-call cost of Python, ctypes and OpenMP."""
    bound = w.buffers.get(("kernel", output_slices))
    if bound is None:
        bound = _bind_kernel(y, x, w, output_slices)
        if bound is None:
            return False
    call, n_cols = bound
    if y.dtype != w.a_t.dtype or x.dtype != y.dtype or y.stride(1) != 1 or x.stride(1) != 1 \
            or groups.segments[-1][0] >= w.a_t.size(0) or y.size(1) < n_cols:
        return False
    call(y, x, *(groups.kernel_ptrs or _kernel_ptrs(groups)), scale)
    return True


def _bind_kernel(y: torch.Tensor, x: torch.Tensor, w: FusedLora, output_slices: tuple[int, ...]):
    """The bound kernel call for this layer and output slices, with the columns y must have
    (None: not for the kernels)."""
    import torch

    k = cpu_kernels.loaded()
    if k is None or not k.supports(y.dtype) or x.dtype != y.dtype or w.a_t.dtype != y.dtype:
        return None
    a = w.a_t.transpose(1, 2)  # (slots, n_slices * rank, in): vLLM's own layout, unit stride in `in`
    if a.stride(2) != 1 or len(output_slices) != len(w.b_t) or sum(output_slices) > y.size(1):
        return None
    call = k.bind_linear(a, dense_b(w), output_slices, round_out=y.dtype != torch.float32)
    bound = w.buffers[("kernel", output_slices)] = (call, sum(output_slices))
    return bound


def _lora_linear_per_group(y: torch.Tensor, xf: torch.Tensor, w: FusedLora, scale: float,
                           output_slices: tuple[int, ...], groups: TokenGroups) -> None:
    import torch

    r = w.rank
    xs = xf.index_select(0, groups.order)
    out = torch.zeros(xs.size(0), sum(output_slices), dtype=y.dtype, device=y.device)
    for slot, start, end in groups.segments:
        buf = torch.mm(xs[start:end], w.a_t[slot])
        if scale != 1.0:
            buf.mul_(scale)
        buf = buf.to(y.dtype)
        off = 0
        for i, size in enumerate(output_slices):
            out[start:end, off: off + size].addmm_(buf[:, i * r: (i + 1) * r],
                                                   w.b_t[i][slot, :, :size])
            off += size
    y[:, : out.size(1)].index_add_(0, groups.order, out)


# ---------------------------------------------------------------- the PunicaWrapperCPU methods


def _update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
    _stock["update_metadata"](self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
    d = self.__dict__
    self._loraloop_tokens = group_tokens(self.token_lora_indices, d.get("_loraloop_tokens"))
    self._loraloop_layout = tuple(lora_index_to_id)
    self._loraloop_sampler = group_tokens(self.sampler_indices, d.get("_loraloop_sampler"))


def _fused(self, a_stacked, b_stacked) -> FusedLora | None:
    a0, b0 = a_stacked[0], b_stacked[0]
    if a0.dim() != 4 or a0.size(1) != 1 or b0.dim() != 4 or b0.size(1) != 1:
        return None  # not the (slots, 1, rank, in) / (slots, 1, out, rank) layout of vLLM 0.32
    cache = self.__dict__.setdefault("_loraloop_fused", {})
    key = id(a0)
    cache[key] = fuse_lora_weights(a_stacked, b_stacked, cache.get(key),
                                   self.__dict__.get("_loraloop_layout"))
    return cache[key]


def _add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *,
                     buffer=None, **kwargs):
    import torch

    groups = getattr(self, "_loraloop_tokens", None)
    if groups is not None and not groups.any_lora and x.size(0) == groups.n_rows:
        return None  # no row has an adapter: nothing to add (a base-only batch in a LoRA engine)
    w = None if groups is None else _fused(self, lora_a_stacked, lora_b_stacked)
    if (w is None or torch.compiler.is_compiling() or x.size(0) != groups.n_rows
            or y.dim() != 2 or lora_b_stacked[0].dtype != y.dtype):
        return _stock["add_lora_linear"](self, y, x, lora_a_stacked, lora_b_stacked, scale,
                                         output_slices, buffer=buffer, **kwargs)
    lora_linear(y, x, w, scale, tuple(output_slices), groups)
    _announce()
    return None


def _add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
    import torch

    groups = getattr(self, "_loraloop_sampler", None)
    y2, x2 = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
    a, b = (lora_a_stacked,), (lora_b_stacked,)
    w = None if groups is None else _fused(self, a, b)
    if (w is None or torch.compiler.is_compiling() or x2.size(0) != groups.n_rows
            or lora_b_stacked.dtype != y.dtype):
        return _stock["add_lora_logits"](self, y, x, lora_a_stacked, lora_b_stacked, scale,
                                         buffer=buffer, **kwargs)
    # The adapter's vocab rows may be padded differently from the logits (as in bgmv_expand).
    common = min(y2.size(1), lora_b_stacked.size(2))
    lora_linear(y2, x2, w, scale, (common,), groups)
    return None


def _announce() -> None:
    # Logged at the first fast call, not at install: vLLM configures its log handlers in the
    # engine processes only after the plugins have loaded.
    global _announced
    if not _announced:
        _announced = True
        k = cpu_kernels.loaded()
        log.info("fast CPU LoRA ops in use in pid %d; mixed-adapter batches: %s; one adapter: %s",
                 os.getpid(), f"C kernels ({k.isa}, {k.path.name})" if k else "torch ops (C kernels not loaded)",
                 f"C kernels for {', '.join(sorted(str(d).removeprefix('torch.') for d in k.blocked))}, "
                 "else torch matmuls" if k and k.blocked else "torch matmuls")


_REPLACEMENTS = {
    "update_metadata": _update_metadata,
    "add_lora_linear": _add_lora_linear,
    "add_lora_logits": _add_lora_logits,
}


# ---------------------------------------------------------------- guard and install


def check_vllm_lora_api() -> list[str]:
    """What differs, in the installed vLLM, from what the fast ops replace ([] = all as expected)."""
    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
    from vllm.platforms.cpu import CpuPlatform

    problems = []
    cls = getattr(punica_cpu, "PunicaWrapperCPU", None)
    if cls is None:
        return [f"{WRAPPER_QUALNAME} is gone"]
    if CpuPlatform.get_punica_wrapper() != WRAPPER_QUALNAME:
        problems.append(f"CPU platform now uses {CpuPlatform.get_punica_wrapper()}")
    for name, params in EXPECTED_PARAMS.items():
        fn = _stock.get(name) or getattr(cls, name, None)
        got = tuple(inspect.signature(fn).parameters) if callable(fn) else None
        if got != params:
            problems.append(f"PunicaWrapperCPU.{name}{got} != expected {params}")
    for name in EXPECTED_PROPERTIES:
        if not isinstance(getattr(PunicaWrapperBase, name, None), property):
            problems.append(f"PunicaWrapperBase.{name} is no longer a property")
    return problems


def install_fast_cpu_lora_ops(strict: bool = False) -> bool:
    """Replace PunicaWrapperCPU's LoRA ops in this process; True if the fast ops are in place.

    No-op (False) off the CPU platform. If the installed vLLM differs from what is replaced,
    raises LoraOpsMismatch when `strict`, else logs an error and keeps the stock ops.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    if getattr(PunicaWrapperCPU, _PATCHED_FLAG, False):
        return True
    problems = check_vllm_lora_api()
    if problems:
        msg = "fast CPU LoRA ops NOT installed, stock ops kept: " + "; ".join(problems)
        if strict:
            raise LoraOpsMismatch(msg)
        log.error(msg)
        return False
    cpu_kernels.load()  # compiled on first use, cached; None (torch ops for mixed batches) if it cannot be
    for name, fn in _REPLACEMENTS.items():
        _stock[name] = getattr(PunicaWrapperCPU, name)
        setattr(PunicaWrapperCPU, name, fn)
    setattr(PunicaWrapperCPU, _PATCHED_FLAG, True)
    log.debug("fast CPU LoRA ops installed in pid %d", os.getpid())
    return True


def uninstall_fast_cpu_lora_ops() -> None:
    """Put the stock methods back (tests, A/B benchmarks)."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    if getattr(PunicaWrapperCPU, _PATCHED_FLAG, False):
        for name, fn in _stock.items():
            setattr(PunicaWrapperCPU, name, fn)
        setattr(PunicaWrapperCPU, _PATCHED_FLAG, False)
        _stock.clear()


def register() -> None:
    """`vllm.general_plugins` entry point: vLLM calls it in every process it starts."""
    if os.environ.get(ENV_SWITCH, "1") != "0":
        install_fast_cpu_lora_ops()
