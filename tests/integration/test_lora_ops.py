"""services.rollout.lora_ops: the fast CPU LoRA ops against vLLM's stock torch ops, and the guard
that fails loudly when a vLLM upgrade changes what they replace."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from services.rollout import cpu_kernels, lora_ops  # noqa: E402

SLOTS, RANK = 4, 16
# (input size, output slices): qkv with GQA, o_proj, gate_up, down_proj of a small Qwen2
LAYERS = [(64, (64, 16, 16)), (64, (64,)), (64, (176, 176)), (176, (64,))]
# Per-token adapter slot, -1 = no adapter
MAPPINGS = {
    "one adapter": [2] * 9,
    "mixed": [0, 1, 0, 2, 2, 1, 0, 2, 1],
    "mixed with -1": [-1, 1, 0, -1, 2, 1, -1, 0, 2],
    "one adapter with -1": [-1, 1, 1, -1, 1],
    "all -1": [-1] * 5,
    # A bf16 prefill of one adapter above ONE_BY_KERNEL_MAX_ROWS_BF16 rows: torch's matmuls there.
    "one adapter, prefill": [1] * 400,
    "slot gap": [0, 2, 2, 0],
    "balanced, no padding": [2, 0, 1, 1, 0, 2],
    # one adapter's long prefill chunk beside others' decode tokens: one matmul per group
    "unbalanced": [0] * 20 + [2, -1, 1],
}


def stacked(in_size: int, slices: tuple[int, ...], empty_last: bool = True, seed: int = 0):
    """vLLM's layout: per slice A (slots, 1, rank, in) and B (slots, 1, out, rank); scaled so
    outputs are O(1) and 1e-5 is a relative tolerance. Stock ops read slot -1 (the last one) for
    tokens without adapter, so it is left empty where they are the reference."""
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(SLOTS, 1, RANK, in_size, generator=g) / in_size**0.5 for _ in slices)
    b = tuple(torch.randn(SLOTS, 1, out, RANK, generator=g) / RANK**0.5 for out in slices)
    if empty_last:
        for t in (*a, *b):
            t[SLOTS - 1] = 0
    return a, b


def stock_lora_linear(y, x, a, b, scale, slices, idx):
    from vllm.lora.ops.torch_ops import bgmv_expand_slice, bgmv_shrink

    bufs = [torch.zeros(x.size(0), RANK) for _ in slices]
    for i in range(len(slices)):
        bgmv_shrink(x, a[i], bufs[i], idx, scale)
    off = 0
    for i, size in enumerate(slices):
        bgmv_expand_slice(bufs[i], b[i], y, idx, off, size, True)
        off += size


def loop_reference(y, x, a, b, scale, slices, idx):
    """Row by row, skipping rows without adapter: what LoRA means."""
    for row, slot in enumerate(idx.tolist()):
        if slot < 0:
            continue
        off = 0
        for i, size in enumerate(slices):
            y[row, off: off + size] += scale * (x[row] @ a[i][slot, 0].T) @ b[i][slot, 0].T
            off += size


@pytest.fixture(params=["c kernels", "torch ops"])
def mixed_path(request, monkeypatch):
    """Mixed batches run through the C kernels (cpu_kernels.py) or, where those cannot be built,
    the torch ops: both are tested. Yields the list of kernel calls, to show which path ran."""
    calls: list[str] = []
    if request.param == "torch ops":
        monkeypatch.setattr(cpu_kernels, "_loaded", None)
    else:
        k = cpu_kernels.load(strict=True)
        real = k.bind_linear

        def bind_linear(*args, **kwargs):  # lora_ops binds a layer's call once, then calls it
            call = real(*args, **kwargs)

            def spy(*a, **kw):
                calls.append("kernel")
                return call(*a, **kw)

            return spy

        monkeypatch.setattr(k, "bind_linear", bind_linear)
    calls.append(request.param)
    yield calls


def kernel_ran(calls: list[str], idx: torch.Tensor, dtype: torch.dtype = torch.float32) -> bool:
    """The C kernels ran exactly when they should: on the C path, for batches mixing adapters,
    and for one adapter on every row where they have blocked items for the dtype (AVX-512)."""
    groups = lora_ops.group_tokens(idx)
    mixed = groups.any_lora and groups.single < 0
    k = cpu_kernels.loaded()
    one = groups.single >= 0 and k is not None and dtype in k.blocked and (
        dtype != torch.bfloat16 or len(idx) <= lora_ops.ONE_BY_KERNEL_MAX_ROWS_BF16)
    return ("kernel" in calls) == ((mixed or one) and calls[0] == "c kernels")


@pytest.mark.parametrize("in_size,slices", LAYERS)
@pytest.mark.parametrize("mapping", list(MAPPINGS))
def test_lora_linear_matches_stock_ops(in_size, slices, mapping, mixed_path):
    idx = torch.tensor(MAPPINGS[mapping])
    a, b = stacked(in_size, slices)
    x = torch.randn(len(idx), in_size)
    y0 = torch.randn(len(idx), sum(slices))
    want, got = y0.clone(), y0.clone()
    stock_lora_linear(want, x, a, b, 0.5, slices, idx)
    lora_ops.lora_linear(got, x, lora_ops.fuse_lora_weights(a, b), 0.5, slices,
                         lora_ops.group_tokens(idx))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert kernel_ran(mixed_path, idx)


def test_unbalanced_groups_are_not_padded():
    assert lora_ops.group_tokens(torch.tensor(MAPPINGS["unbalanced"])).gather is None
    assert lora_ops.group_tokens(torch.tensor(MAPPINGS["mixed with -1"])).gather is not None
    assert lora_ops.group_tokens(torch.tensor(MAPPINGS["slot gap"])).mask is not None  # slot 1 unused
    assert lora_ops.group_tokens(torch.tensor(MAPPINGS["balanced, no padding"])).mask is None


def test_groups_are_reused_while_the_mapping_stays_the_same():
    first = lora_ops.group_tokens(torch.tensor(MAPPINGS["mixed"]))
    assert lora_ops.group_tokens(torch.tensor(MAPPINGS["mixed"]), first) is first  # decode steps
    changed = lora_ops.group_tokens(torch.tensor(MAPPINGS["mixed with -1"]), first)
    assert changed is not first
    assert changed.segments == lora_ops.group_tokens(torch.tensor(MAPPINGS["mixed with -1"])).segments
    assert torch.equal(changed.seg_table, torch.tensor(changed.segments))


def test_rows_without_adapter_are_untouched_when_every_slot_is_used(mixed_path):
    # Stock ops would apply the adapter in the last slot to these rows (lora_weights[-1]).
    idx = torch.tensor([-1, 3, 0, -1, 1, 2, 3])
    a, b = stacked(64, (64, 16, 16), empty_last=False)
    x, y0 = torch.randn(len(idx), 64), torch.randn(len(idx), 96)
    want, got = y0.clone(), y0.clone()
    loop_reference(want, x, a, b, 1.0, (64, 16, 16), idx)
    lora_ops.lora_linear(got, x, lora_ops.fuse_lora_weights(a, b), 1.0, (64, 16, 16),
                         lora_ops.group_tokens(idx))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[[0, 3]], y0[[0, 3]])
    assert kernel_ran(mixed_path, idx)


def test_fused_weights_follow_a_new_adapter_in_a_slot():
    a, b = stacked(64, (64, 16, 16))
    fused = lora_ops.fuse_lora_weights(a, b)
    assert lora_ops.fuse_lora_weights(a, b, fused) is fused  # nothing written: reused
    a[1][0, 0].copy_(torch.randn(RANK, 64))  # what vLLM's set_lora does
    refreshed = lora_ops.fuse_lora_weights(a, b, fused)
    assert refreshed is not fused
    torch.testing.assert_close(refreshed.a_t[0, :, :RANK], a[0][0, 0].T, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mapping", ["one adapter", "mixed"])
def test_a_new_adapter_in_a_slot_is_what_the_next_step_applies(dtype, mapping, mixed_path):
    # The C kernels read lora_ops' own copies (a_t, dense_b) through a call bound once per layer:
    # after vLLM writes another adapter into the slot, the next step must apply the new one.
    slices = (64, 16, 16)
    idx = torch.tensor(MAPPINGS[mapping])
    a, b = stacked(64, slices)
    a, b = tuple(t.to(dtype) for t in a), tuple(t.to(dtype) for t in b)
    x = torch.randn(len(idx), 64).to(dtype)
    groups = lora_ops.group_tokens(idx)
    fused = lora_ops.fuse_lora_weights(a, b, layout=(5, 7, 9, None))
    lora_ops.lora_linear(torch.zeros(len(idx), 96, dtype=dtype), x, fused, 1.0, slices, groups)
    for t in (*a, *b):  # vLLM's activate_adapter writes adapter 11 into slot 2
        t[2].copy_(torch.randn_like(t[2]) / 4)
    fused = lora_ops.fuse_lora_weights(a, b, fused, layout=(5, 7, 11, None))
    want, got = torch.zeros(len(idx), 96, dtype=dtype), torch.zeros(len(idx), 96, dtype=dtype)
    stock_lora_linear(want, x, a, b, 1.0, slices, idx)
    lora_ops.lora_linear(got, x, fused, 1.0, slices, groups)
    tol = 1e-5 if dtype == torch.float32 else 2 * 2**-7 * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.float(), want.float(), rtol=0 if dtype != torch.float32 else 1e-5, atol=tol)
    assert kernel_ran(mixed_path, idx, dtype)


@pytest.mark.parametrize("slices,dtype", [((64, 16, 16), torch.float32), ((64,), torch.float32),
                                          ((64, 16, 16), torch.bfloat16)])
def test_fused_weights_refresh_only_the_slots_whose_adapter_changed(slices, dtype):
    a, b = stacked(64, slices)
    a, b = tuple(t.to(dtype) for t in a), tuple(t.to(dtype) for t in b)
    fused = lora_ops.fuse_lora_weights(a, b, layout=(5, 7, 9, None))
    lora_ops.dense_weights(fused)
    for t in (*a, *b):  # vLLM's activate_adapter writes adapter 11 into slot 1
        t[1].copy_(torch.randn_like(t[1]))
    refreshed = lora_ops.fuse_lora_weights(a, b, fused, layout=(5, 11, 9, None))
    assert refreshed is fused  # refreshed in place
    rebuilt = lora_ops.fuse_lora_weights(a, b)
    torch.testing.assert_close(refreshed.a_t, rebuilt.a_t, rtol=0, atol=0)
    for got, want in zip(refreshed.dense_b, rebuilt.b_t, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(refreshed.dense_a, rebuilt.a_t, rtol=0, atol=0)
    assert (rebuilt.block_diag is not None) == (dtype == torch.bfloat16 and len(slices) == 3)
    if rebuilt.block_diag is not None:
        torch.testing.assert_close(refreshed.block_diag, rebuilt.block_diag, rtol=0, atol=0)
    # A write that no layout change explains: everything is rebuilt.
    a[0][2].zero_()
    again = lora_ops.fuse_lora_weights(a, b, refreshed, layout=(5, 11, 9, None))
    assert again is not refreshed and not again.a_t[2, :, :RANK].any()


@pytest.fixture
def installed():
    assert lora_ops.install_fast_cpu_lora_ops(strict=True)
    yield
    lora_ops.uninstall_fast_cpu_lora_ops()


def wrapper_with_mapping(lora_ids: list[int], lora_index_to_id: list[int | None]):
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    w = PunicaWrapperCPU(64, max_batches=8, device="cpu")
    w.update_metadata(LoRAMapping(tuple(lora_ids), tuple(lora_ids), is_prefill=True),
                      lora_index_to_id, SLOTS + 1, 32)
    return w


@pytest.mark.parametrize("lora_ids", [[7, 7, 7, 7], [5, 0, 7, 9, 7, 5], [0, 0, 0]])
def test_patched_wrapper_matches_stock_wrapper(installed, lora_ids):
    # Slots 0..2 hold adapters 5, 7, 9; lora id 0 is "no adapter".
    slot_ids = [5, 7, 9, None]
    a, b = stacked(64, (64, 16, 16))
    x, y0 = torch.randn(len(lora_ids), 64), torch.randn(len(lora_ids), 96)
    got = y0.clone()
    fast = wrapper_with_mapping(lora_ids, slot_ids)
    fast.add_lora_linear(got, x, a, b, 1.0, (64, 16, 16))
    # The fast path ran, not the stock fallback (with no adapter in the batch it adds nothing).
    assert fast.__dict__.get("_loraloop_fused") or not any(lora_ids)
    lora_ops.uninstall_fast_cpu_lora_ops()
    want = y0.clone()
    wrapper_with_mapping(lora_ids, slot_ids).add_lora_linear(want, x, a, b, 1.0, (64, 16, 16))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_patched_wrapper_logits_match_stock(installed):
    slot_ids = [5, 7, 9, None]
    lora_ids = [7, 0, 5, 7]
    (a,), (b,) = stacked(64, (40,))  # lm_head adapter rows padded beyond the 32 logits
    x, y0 = torch.randn(len(lora_ids), 64), torch.randn(len(lora_ids), 32)
    got = y0.clone()
    fast = wrapper_with_mapping(lora_ids, slot_ids)
    fast.add_lora_logits(got, x, a, b, 1.0)
    assert fast._loraloop_fused  # the fast path ran, not the stock fallback
    lora_ops.uninstall_fast_cpu_lora_ops()
    want = y0.clone()
    wrapper_with_mapping(lora_ids, slot_ids).add_lora_logits(want, x, a, b, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_installed_vllm_has_what_the_fast_ops_replace():
    """Fails on a vLLM upgrade that moves or re-signs PunicaWrapperCPU's methods: re-check the
    fast ops against the new stock ops, then update EXPECTED_PARAMS."""
    assert lora_ops.check_vllm_lora_api() == []


def test_install_is_idempotent_and_reversible(installed):
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    assert PunicaWrapperCPU.add_lora_linear is lora_ops._add_lora_linear
    assert lora_ops.install_fast_cpu_lora_ops()  # plugins may be loaded twice in one process
    lora_ops.uninstall_fast_cpu_lora_ops()
    assert PunicaWrapperCPU.add_lora_linear is not lora_ops._add_lora_linear


def test_a_changed_signature_keeps_the_stock_ops(monkeypatch):
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, output_slices, **kwargs):
        pass

    monkeypatch.setattr(PunicaWrapperCPU, "add_lora_linear", add_lora_linear)
    assert any("add_lora_linear" in p for p in lora_ops.check_vllm_lora_api())
    with pytest.raises(lora_ops.LoraOpsMismatch, match="add_lora_linear"):
        lora_ops.install_fast_cpu_lora_ops(strict=True)
    assert not lora_ops.install_fast_cpu_lora_ops()
    assert PunicaWrapperCPU.add_lora_linear is add_lora_linear


def test_plugin_is_registered_with_vllm():
    """The engine worker gets the fast ops through vLLM's general-plugin entry point."""
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("loraloop_lora_ops") == "services.rollout.lora_ops:register"


@pytest.mark.parametrize("in_size,slices", LAYERS)
@pytest.mark.parametrize("mapping", ["one adapter", "mixed", "mixed with -1", "balanced, no padding",
                                     "one adapter, prefill"])
def test_bf16_lora_linear_matches_stock_ops(in_size, slices, mapping, mixed_path):
    """bf16 weights and activations (the 0.5B bench's dtype): no float32 copies here, block-diagonal
    qkv expand. Stock ops shrink in float32 and round to bf16 before the expand, a bf16 matmul
    accumulates in float32 and rounds once: the same up to summation order, which can flip the
    last bit of a rounded value: 2 bf16 ulps of the O(1) outputs (2 * 2**-7) is the tolerance."""
    idx = torch.tensor(MAPPINGS[mapping])
    a, b = stacked(in_size, slices)
    a, b = tuple(t.bfloat16() for t in a), tuple(t.bfloat16() for t in b)
    x = torch.randn(len(idx), in_size).bfloat16()
    y0 = torch.randn(len(idx), sum(slices)).bfloat16()
    want, got = y0.clone(), y0.clone()
    stock_lora_linear(want, x, a, b, 1.0, slices, idx)
    fused = lora_ops.fuse_lora_weights(a, b)
    assert fused.a_t.dtype == torch.bfloat16 and (fused.block_diag is not None) == (len(slices) == 3)
    lora_ops.lora_linear(got, x, fused, 1.0, slices, lora_ops.group_tokens(idx))
    assert not torch.equal(got, y0)  # the adapter acted
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2 * 2**-7 * max(1.0, want.abs().max().item()))
    assert kernel_ran(mixed_path, idx, torch.bfloat16)
