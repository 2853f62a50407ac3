"""services.rollout.cpu_kernels: the segmented LoRA kernels (lora_cpu.c) against a float64
reference, their argument checks, and the build cache. Compiles with the machine's C compiler."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from services.rollout import cpu_kernels  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")


@pytest.fixture(scope="module")
def k():
    return cpu_kernels.load(strict=True)


@pytest.fixture(scope="module", params=["native", "avx512 without bf16", "portable"])
def kk(request, k):
    """The kernels as built for this CPU, built without AVX512_BF16 (bf16 through the portable
    items, float32 through the blocked ones), and built without AVX-512 (the portable loops that
    CPUs without it run): each is checked here whatever this machine has."""
    if request.param == "native":
        return k
    extra = "-mno-avx512bf16" if request.param == "avx512 without bf16" else "-mno-avx512f"
    built = cpu_kernels.CpuKernels(cpu_kernels.build(flags=(*cpu_kernels.FLAGS, extra)))
    assert not built.dpbf16 and torch.bfloat16 not in built.blocked
    if request.param == "portable":
        assert built.isa == "portable" and not built.blocked
    return built


def segments(slots_of_rows: list[int]):
    """rows sorted by slot and (slot, start, end) triples, as lora_ops.group_tokens makes them."""
    order = sorted((s, i) for i, s in enumerate(slots_of_rows) if s >= 0)
    rows = torch.tensor([i for _, i in order], dtype=torch.long)
    seg, start = [], 0
    for slot in sorted({s for s, _ in order}):
        n = sum(1 for s, _ in order if s == slot)
        seg.append((slot, start, start + n))
        start += n
    return rows, torch.tensor(seg, dtype=torch.long).view(-1, 3)


# Row -> slot (-1: no adapter). Segments of 1..37 rows cover the 4-row blocks, the 16-row
# shrink chunks and their remainders.
MAPPINGS = {
    "mixed": [0, 1, 0, 2, 2, 1, 0, 2, 1, 0, 0, 0],
    "with -1": [-1, 3, 0, -1, 1, 2, 3, 3, 3, 3, 3],
    "one slot": [1] * 9,
    "singletons": [3, 2, 1, 0],
    # Longer than a shrink chunk (16 rows) and than two: the bf16 items' row chunks and prefetches.
    "long": [2] * 37 + [0, 1, 1] + [3] * 18,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mapping", list(MAPPINGS))
# (40, 5, 70): odd rank (the last bf16 pair half empty), ranks not a multiple of the 4-rank blocks,
# columns not a multiple of the 64-column items.
@pytest.mark.parametrize("k_in,rank,n_out", [(64, 16, 64), (67, 8, 300), (200, 48, 5), (896, 16, 600),
                                             (40, 5, 70)])
def test_shrink_and_expand_match_float64(kk, dtype, mapping, k_in, rank, n_out):
    k = kk
    slots = 4
    idx = MAPPINGS[mapping]
    rows, seg = segments(idx)
    g = torch.Generator().manual_seed(k_in + rank)
    x = torch.randn(len(idx), k_in, generator=g).to(dtype)
    a = (torch.randn(slots, rank, k_in, generator=g) / k_in**0.5).to(dtype)
    b = (torch.randn(slots, rank, n_out, generator=g) / rank**0.5).to(dtype)
    wide = torch.randn(len(idx), n_out + 7, generator=g).to(dtype)  # y is a column slice: ldy > N
    y = wide[:, 3: 3 + n_out]
    y0, wide0 = y.clone(), wide.clone()

    buf = torch.full((len(idx), rank + 2), float("nan"))  # ldo > R; rows without adapter stay NaN
    k.shrink(x, a, rows, seg, 0.5, buf, round_out=dtype == torch.bfloat16)
    k.expand(y, buf, b, rows, seg)

    for i, slot in enumerate(idx):
        if slot < 0:
            assert torch.equal(wide[i], wide0[i])
            continue
        want_buf = 0.5 * (x[i].double() @ a[slot].double().T)
        want_y = y0[i].double() + want_buf @ b[slot].double()
        if dtype == torch.float32:
            torch.testing.assert_close(buf[i, :rank].double(), want_buf, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(y[i].double(), want_y, rtol=1e-5, atol=1e-5)
        else:
            # buf is rounded to bf16 (1 ulp), then y is rounded once: 2 ulps of the O(1) values
            tol = 2 * 2**-7 * max(1.0, want_y.abs().max().item())
            torch.testing.assert_close(buf[i, :rank].double(), want_buf, rtol=2**-7, atol=2**-7)
            torch.testing.assert_close(y[i].double(), want_y, rtol=0, atol=tol)
    # Columns beside the slice are never written.
    assert torch.equal(wide[:, :3], wide0[:, :3]) and torch.equal(wide[:, 3 + n_out:], wide0[:, 3 + n_out:])
    assert not torch.equal(y, y0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mapping", list(MAPPINGS))
def test_one_call_per_layer_equals_shrink_then_expand_per_slice(kk, dtype, mapping):
    k = kk
    slots, rank, k_in, n_out = 4, 8, 72, (300, 40, 40)  # qkv-like: three slices, one wide
    idx = MAPPINGS[mapping]
    rows, seg = segments(idx)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(len(idx), k_in, generator=g).to(dtype)
    a = (torch.randn(slots, rank * len(n_out), k_in, generator=g) / k_in**0.5).to(dtype)
    bs = tuple((torch.randn(slots, rank, n + 5, generator=g) / rank**0.5).to(dtype) for n in n_out)
    wide = torch.randn(len(idx), sum(n_out) + 4, generator=g).to(dtype)  # y wider than the slices
    want = wide.clone()
    buf = torch.empty(len(idx), rank * len(n_out))
    k.shrink(x, a, rows, seg, 2.0, buf, dtype == torch.bfloat16)
    off = 0
    for i, (b, n) in enumerate(zip(bs, n_out, strict=True)):
        k.expand(want[:, off: off + n], buf[:, i * rank: (i + 1) * rank], b[:, :, :n], rows, seg)
        off += n
    got = wide.clone()
    k.linear(got, x, a, k.slice_args(bs, n_out), rows, seg, 2.0, torch.empty_like(buf),
             dtype == torch.bfloat16)
    assert torch.equal(got, want)  # the same items in the same order: bit for bit
    assert torch.equal(got[:, sum(n_out):], wide[:, sum(n_out):])
    assert not torch.equal(got, wide) or all(s < 0 for s in idx)
    with pytest.raises(ValueError, match="linear"):  # slices wider than y
        k.linear(got[:, :100], x, a, k.slice_args(bs, n_out), rows, seg, 2.0, buf, False)


def test_bf16_dot_product_items_are_built_where_the_cpu_has_them(k):
    # lora_cpu.c compiles its vdpbf16ps items under -march=native when the CPU has AVX512_BF16;
    # lora_ops then sends one-adapter bf16 layers to the kernels too.
    flags = Path("/proc/cpuinfo").read_text().split()
    assert k.dpbf16 == ("avx512_bf16" in flags and "avx512bw" in flags)
    assert k.isa.endswith("+bf16") == k.dpbf16
    assert (torch.bfloat16 in k.blocked) == k.dpbf16
    assert (torch.float32 in k.blocked) == ("avx512f" in flags and "avx512bw" in flags)


def test_bf16_rounding_is_to_nearest_even_and_keeps_nan(kk):
    k = kk
    # One row, rank 1, K 1: buf = x * a exactly; y += buf * 1. y0 = 1, so the sum's rounding to
    # bf16 is torch's (round to nearest even) on values that sit exactly between two bf16s.
    rows, seg = segments([0])
    # A NaN with every mantissa bit set: rounding it as a number would carry into the sign (-0).
    nan_payload = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
    steps = torch.cat([torch.tensor([2**-8, 3 * 2**-8, 2**-9, float("nan"), float("inf")]), nan_payload])
    for s in steps.tolist():
        x = torch.tensor([[1.0]], dtype=torch.bfloat16)
        a = torch.ones(1, 1, 1, dtype=torch.bfloat16)
        b = torch.ones(1, 1, 1, dtype=torch.bfloat16)
        buf = torch.tensor([[s]], dtype=torch.float32)
        y = torch.ones(1, 1, dtype=torch.bfloat16)
        k.expand(y, buf, b, rows, seg)
        want = (torch.tensor(1.0) + torch.tensor(s)).to(torch.bfloat16)
        assert torch.equal(y, want.view(1, 1)) or (want.isnan() and y.isnan().all()), (s, y, want)
        k.shrink(x, a, rows, seg, s, buf, round_out=True)
        assert torch.equal(buf.to(torch.bfloat16), torch.tensor([[s]]).to(torch.bfloat16)) or buf.isnan().all()


def test_bad_arguments_are_refused(k):
    rows, seg = segments([0, 1])
    x, a = torch.randn(2, 8), torch.randn(2, 4, 8)
    buf = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="shrink"):
        k.shrink(x.bfloat16(), a, rows, seg, 1.0, buf, False)  # dtypes differ
    with pytest.raises(ValueError, match="shrink"):
        k.shrink(x.t().contiguous().t(), a, rows, seg, 1.0, buf, False)  # x not unit stride in K
    with pytest.raises(ValueError, match="out of bounds"):
        k.shrink(x, a, rows, torch.tensor([[2, 0, 2]]), 1.0, buf, False)  # slot 2 of 2
    with pytest.raises(ValueError, match="out of bounds"):
        k.expand(torch.zeros(2, 8), buf, torch.randn(2, 4, 8), torch.tensor([0, 5]), seg)
    with pytest.raises(ValueError, match="expand"):
        k.expand(torch.zeros(2, 8, dtype=torch.float16), buf, torch.randn(2, 4, 8).half(), rows, seg)


def test_build_is_cached_per_source_and_skipped_when_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_CACHE, str(tmp_path))
    first = cpu_kernels.build()
    assert first.parent == tmp_path and first.exists()
    mtime = first.stat().st_mtime_ns
    assert cpu_kernels.build() == first and first.stat().st_mtime_ns == mtime  # not rebuilt
    assert not list(tmp_path.glob(".*.tmp"))  # no temporaries left
    # Another source is another library.
    src = tmp_path / "lora_cpu.c"
    src.write_text(cpu_kernels.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", src)
    assert cpu_kernels.library_path("cc") != first


def test_without_compiler_or_when_switched_off_load_gives_none(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_CACHE, str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setenv("CC", "no-such-cc")
    assert cpu_kernels.load() is None  # logged, torch ops stay
    with pytest.raises(cpu_kernels.KernelBuildError, match="no C compiler"):
        cpu_kernels.load(strict=True)
    monkeypatch.delenv("CC")
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    assert cpu_kernels.load() is None
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH)
    assert cpu_kernels.load(strict=True) is not None  # a strict load tries again
    assert cpu_kernels.loaded() is not None


def test_a_broken_source_is_a_build_error_with_the_compiler_output(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_CACHE, str(tmp_path))
    src = tmp_path / "broken.c"
    src.write_text("int f( {\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", src)
    with pytest.raises(cpu_kernels.KernelBuildError, match="error"):
        cpu_kernels.build()
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bound_layer_call_equals_linear(k, dtype):
    # lora_ops binds each layer's call once (weights' pointers, slices' table) and calls it with
    # rows of every step, its buffer the thread's float32 scratch: the same results as linear(),
    # also for more rows than before and with another default dtype (vLLM sets the model's while
    # it builds the model).
    slots, rank, k_in, n_out = 4, 8, 72, (300, 40, 40)
    g = torch.Generator().manual_seed(3)
    a = (torch.randn(slots, rank * len(n_out), k_in, generator=g) / k_in**0.5).to(dtype)
    bs = tuple((torch.randn(slots, rank, n, generator=g) / rank**0.5).to(dtype) for n in n_out)
    call = k.bind_linear(a, bs, n_out, round_out=dtype == torch.bfloat16)
    for idx in (MAPPINGS["singletons"], MAPPINGS["long"], MAPPINGS["mixed"]):
        rows, seg = segments(idx)
        x = torch.randn(len(idx), k_in, generator=g).to(dtype)
        y0 = torch.randn(len(idx), sum(n_out), generator=g).to(dtype)
        want, got = y0.clone(), y0.clone()
        k.linear(want, x, a, k.slice_args(bs, n_out), rows, seg, 0.5, torch.empty(len(idx), a.size(1)),
                 dtype == torch.bfloat16)
        default = torch.get_default_dtype()
        if idx is MAPPINGS["long"]:  # the thread's scratch is made anew under a 16-bit default
            cpu_kernels._scratch.__dict__.pop("buf", None)
            torch.set_default_dtype(torch.bfloat16)
        try:
            call(got, x, rows.data_ptr(), seg.data_ptr(), seg.size(0), 0.5)
        finally:
            torch.set_default_dtype(default)
        assert torch.equal(got, want) and not torch.equal(got, y0)
    _, buf = cpu_kernels.scratch(0)
    assert buf.dtype == torch.float32 and buf.numel() >= len(MAPPINGS["long"]) * a.size(1)
    with pytest.raises(ValueError, match="bind_linear"):
        k.bind_linear(a.transpose(1, 2), bs, n_out, round_out=False)
    with pytest.raises(ValueError, match="rank 0"):
        k.bind_linear(a[:, :0], tuple(b[:, :0] for b in bs), n_out, round_out=False)
