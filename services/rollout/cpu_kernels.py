"""Segmented LoRA kernels for the CPU (lora_cpu.c): built on first use, cached, loaded with ctypes.

lora_ops uses them for batches that mix adapters, and for one adapter too where they are
register-blocked for the dtype (AVX-512; bf16 also needs AVX512_BF16): one call per LoRA layer
(`linear`, bound once per layer with `bind_linear`: the shrink of all slices, then each slice's
expand written straight into the layer's output), instead of torch's gather / batched matmuls /
index_add_. `shrink` and `expand` are the two halves alone.

The C source is compiled once per (source, compiler, CPU flags) with `cc -O3 -march=native
-fopenmp` into a cache directory (`LORALOOP_KERNEL_CACHE`, else `$XDG_CACHE_HOME/loraloop/kernels`,
else `~/.cache/loraloop/kernels`); the write is atomic, so processes that start together (vLLM's
front end and engine core) may both compile and neither reads half a library. Without a C
compiler, or with `LORALOOP_CPU_KERNELS=0`, `load()` returns None and lora_ops keeps its torch
path (logged once). Only pointers, sizes and strides cross into C: no data is copied.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger("vllm.loraloop.cpu_kernels")

SOURCE = Path(__file__).with_name("lora_cpu.c")
ENV_SWITCH = "LORALOOP_CPU_KERNELS"
ENV_CACHE = "LORALOOP_KERNEL_CACHE"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 120

_lock = threading.Lock()
_loaded: CpuKernels | None = None
_tried = False


class KernelBuildError(RuntimeError):
    """The C kernels could not be compiled or loaded."""


def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "loraloop" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _compiler() -> str:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise KernelBuildError(f"no C compiler ({cc!r} not found on PATH)")
    return cc


def library_path(cc: str, flags: tuple[str, ...] = FLAGS) -> Path:
    """Where the library for this source, compiler and CPU lives (the key covers all three: a
    cache shared by machines with other CPUs never hands one a library built for another)."""
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"{cc} --version failed: {e}") from e
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), " ".join(flags).encode(), _cpu_flags().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"lora_cpu-{key.hexdigest()[:20]}.so"


def build(cc: str | None = None, flags: tuple[str, ...] = FLAGS) -> Path:
    """Compile lora_cpu.c if this machine's library is not cached yet; returns its path. Other
    `flags` (tests: `-mno-avx512f`, the portable loops other CPUs run) get their own library."""
    cc = cc or _compiler()
    out = library_path(cc, flags)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    cmd = [cc, *flags, "-o", str(tmp), str(SOURCE)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if r.returncode != 0:
            raise KernelBuildError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: a concurrent builder's identical file may be replaced
    except subprocess.TimeoutExpired as e:
        raise KernelBuildError(f"{' '.join(cmd)} took over {COMPILE_TIMEOUT_S} s") from e
    finally:
        tmp.unlink(missing_ok=True)
    log.info("built CPU LoRA kernels: %s", out)
    return out


_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class CpuKernels:
    """The loaded library, with tensor-level wrappers that check what C cannot."""

    def __init__(self, path: Path) -> None:
        import torch  # first: libgomp.so.1 must resolve to the OpenMP runtime torch loaded

        self.path = path
        self.lib = ctypes.CDLL(str(path))
        for suf in ("bf16", "f32"):
            fn = getattr(self.lib, f"lora_shrink_{suf}")
            fn.argtypes = [_P, _I, _P, _I, _I, _I, _I, _P, _P, _I, _F, _P, _I, ctypes.c_int]
            fn.restype = None
            fn = getattr(self.lib, f"lora_expand_{suf}")
            fn.argtypes = [_P, _I, _P, _I, _P, _I, _I, _I, _I, _P, _P, _I]
            fn.restype = None
            fn = getattr(self.lib, f"lora_linear_{suf}")
            fn.argtypes = [_P, _I, _P, _I, _P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _I, _F,
                           _P, _I, ctypes.c_int]
            fn.restype = None
        self.lib.lora_cpu_isa.restype = ctypes.c_int
        self.isa = "avx512" if self.lib.lora_cpu_isa() == 1 else "portable"
        self.lib.lora_cpu_has_dpbf16.restype = ctypes.c_int
        # bf16 layers use vdpbf16ps items (register-blocked, prefetching): see lora_cpu.c
        self.dpbf16 = self.lib.lora_cpu_has_dpbf16() == 1
        if self.dpbf16:
            self.isa += "+bf16"
        self._suffix = {torch.bfloat16: "bf16", torch.float32: "f32"}
        # dtypes with register-blocked items (AVX-512; bf16 also needs AVX512_BF16), which beat
        # torch's matmuls for one adapter too; the portable loops do not
        self.blocked = frozenset(([torch.float32] if self.isa.startswith("avx512") else [])
                                 + ([torch.bfloat16] if self.dpbf16 else []))

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in self._suffix

    def _check(self, op: str, act: torch.Tensor, w: torch.Tensor, f32: torch.Tensor,
               rows: torch.Tensor, seg: torch.Tensor) -> None:
        """act (n, K) and w (slots, R, K) in one supported dtype with unit stride in K; f32 a
        float32 (n, >= R) buffer with unit stride; rows/seg in bounds. Raises ValueError."""
        import torch

        if act.dtype != w.dtype or not self.supports(act.dtype) or f32.dtype != torch.float32:
            raise ValueError(f"{op}: dtypes {act.dtype}, {w.dtype}, {f32.dtype}")
        if act.dim() != 2 or w.dim() != 3 or act.size(1) != w.size(2) or act.stride(1) != 1 \
                or w.stride(2) != 1 or f32.stride(1) != 1 or f32.size(0) != act.size(0) \
                or f32.size(1) < w.size(1):
            raise ValueError(f"{op}: shapes/strides {tuple(act.shape)} {act.stride()}, "
                             f"{tuple(w.shape)} {w.stride()}, {tuple(f32.shape)} {f32.stride()}")
        if rows.dtype != torch.long or seg.dtype != torch.long or not rows.is_contiguous() \
                or not seg.is_contiguous() or seg.dim() != 2 or seg.size(1) != 3:
            raise ValueError(f"{op}: rows must be int64 (n,), seg int64 (nseg, 3), both contiguous")
        if seg.numel() and (int(seg[:, 0].min()) < 0 or int(seg[:, 0].max()) >= w.size(0)
                            or int(seg[:, 1].min()) < 0 or int(seg[:, 2].max()) > rows.numel()):
            raise ValueError(f"{op}: seg holds a slot or a row range out of bounds")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= act.size(0)):
            raise ValueError(f"{op}: rows holds a row id out of bounds")

    def shrink(self, x: torch.Tensor, a: torch.Tensor, rows: torch.Tensor, seg: torch.Tensor,
               scale: float, out: torch.Tensor, round_out: bool, check: bool = True) -> None:
        """out[i, :R] = scale * x[i] @ a[slot_i].T for the rows in seg. x (n, K), a (slots, R, K)
        both with unit stride in K, same dtype; out float32 (n, >= R), unit stride."""
        if check:
            self._check("shrink", x, a, out, rows, seg)
        getattr(self.lib, f"lora_shrink_{self._suffix[x.dtype]}")(
            x.data_ptr(), x.stride(0), a.data_ptr(), a.stride(0), a.stride(1), a.size(1), a.size(2),
            rows.data_ptr(), seg.data_ptr(), seg.size(0), scale, out.data_ptr(), out.stride(0),
            1 if round_out else 0)

    def expand(self, y: torch.Tensor, buf: torch.Tensor, b: torch.Tensor, rows: torch.Tensor,
               seg: torch.Tensor, check: bool = True) -> None:
        """y[i] += buf[i, :R] @ b[slot_i] for the rows in seg. y (n, N) and b (slots, R, N) with
        unit stride in N, same dtype; buf float32 (n, >= R), unit stride."""
        if check:
            self._check("expand", y, b, buf, rows, seg)
        getattr(self.lib, f"lora_expand_{self._suffix[y.dtype]}")(
            y.data_ptr(), y.stride(0), buf.data_ptr(), buf.stride(0), b.data_ptr(), b.stride(0),
            b.stride(1), b.size(1), b.size(2), rows.data_ptr(), seg.data_ptr(), seg.size(0))


    def slice_args(self, bs: tuple[torch.Tensor, ...], n_out: tuple[int, ...]) -> torch.Tensor:
        """What `linear` needs of a layer's B slices, made once per layer: an int64 (5, n_slices)
        table of data pointer, slot stride, row stride, output columns and column offset. The
        tensors in `bs` (slots, rank, >= n_out[i], unit stride in the last dim) must outlive it."""
        import torch

        if len(bs) != len(n_out) or not bs:
            raise ValueError(f"{len(bs)} B slices for {len(n_out)} output slices")
        if bs[0].dim() == 3 and bs[0].size(1) < 1:
            raise ValueError("B slices of rank 0")
        for b, n in zip(bs, n_out, strict=True):
            if b.dim() != 3 or b.stride(2) != 1 or b.size(2) < n or b.dtype != bs[0].dtype \
                    or b.size(0) != bs[0].size(0) or b.size(1) != bs[0].size(1):
                raise ValueError(f"B slice {tuple(b.shape)} {b.stride()} {b.dtype} for {n} columns")
        offs = [sum(n_out[:i]) for i in range(len(n_out))]
        return torch.tensor([[b.data_ptr() for b in bs], [b.stride(0) for b in bs],
                             [b.stride(1) for b in bs], list(n_out), offs], dtype=torch.long)

    def linear(self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, args: torch.Tensor,
               rows: torch.Tensor, seg: torch.Tensor, scale: float, buf: torch.Tensor,
               round_out: bool, check: bool = True) -> None:
        """A LoRA layer in one call: buf = scale * x @ a[slot].T (a: (slots, n_slices * rank, K)),
        then y[:, off_i: off_i + n_i] += buf[:, slice i] @ B_i[slot] for every slice of `args`
        (from slice_args; B in y's dtype), for the rows in seg."""
        nslice = args.size(1)
        rank = a.size(1) // nslice
        if check:
            import torch

            self._check("linear", x, a, buf, rows, seg)
            if a.size(1) != rank * nslice or y.dim() != 2 or y.dtype != x.dtype or y.stride(1) != 1 \
                    or y.size(0) != x.size(0) or int(args[3].sum()) > y.size(1) \
                    or args.dtype != torch.long or args.size(0) != 5:
                raise ValueError(f"linear: y {tuple(y.shape)} {y.stride()}, a {tuple(a.shape)}, "
                                 f"{nslice} slices of {args[3].tolist()} columns")
        getattr(self.lib, f"lora_linear_{self._suffix[y.dtype]}")(
            y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), a.data_ptr(), a.stride(0),
            a.stride(1), a.size(2), rank, nslice, args[0].data_ptr(), args[1].data_ptr(),
            args[2].data_ptr(), args[3].data_ptr(), args[4].data_ptr(), rows.data_ptr(),
            seg.data_ptr(), seg.size(0), scale, buf.data_ptr(), buf.stride(0), 1 if round_out else 0)

    def bind_linear(self, a: torch.Tensor, bs: tuple[torch.Tensor, ...], n_out: tuple[int, ...],
                    round_out: bool) -> BoundLinear:
        """`linear` for one layer (a, the B slices `bs` and their columns fixed), called as
        f(y, x, rows_ptr, seg_ptr, nseg, scale): a and bs are checked once, here; y, x, rows and
        seg are the caller's to get right (y at least sum(n_out) columns wide)."""
        args = self.slice_args(bs, n_out)
        if a.dim() != 3 or a.stride(2) != 1 or not self.supports(a.dtype) or bs[0].dtype != a.dtype \
                or a.size(0) != bs[0].size(0) or a.size(1) != bs[0].size(1) * len(bs):
            raise ValueError(f"bind_linear: a {tuple(a.shape)} {a.stride()} {a.dtype} for B slices "
                             f"{[tuple(b.shape) for b in bs]} {bs[0].dtype}")
        return BoundLinear(self, a, bs, args, round_out)


_scratch = threading.local()


def scratch(n: int) -> tuple[int, torch.Tensor]:
    """A float32 buffer of at least n elements for the kernels' shrink output, one per thread and
    shared by every layer (layers run one after another): a per-layer buffer would keep the
    largest prefill's rows for each layer. Returns its data pointer and the tensor."""
    t = getattr(_scratch, "buf", None)
    if t is None or t.numel() < n:
        import torch

        t = _scratch.buf = torch.empty(max(n, 1 << 16), dtype=torch.float32)
    return t.data_ptr(), t


class BoundLinear:
    """`CpuKernels.linear` for one layer, with what is the layer's bound once: the weights'
    pointers and strides and the slices' table. The caller guarantees what `linear(check=True)`
    checks of y, x, rows and seg; a, the B slices and the table are kept alive here. One call at a
    time per thread (the buffer is the thread's scratch)."""

    def __init__(self, k: CpuKernels, a: torch.Tensor, bs: tuple[torch.Tensor, ...],
                 args: torch.Tensor, round_out: bool) -> None:
        nslice = args.size(1)
        self.a, self.bs, self.args = a, bs, args
        self.fn = getattr(k.lib, f"lora_linear_{k._suffix[a.dtype]}")
        self.mid = (a.data_ptr(), a.stride(0), a.stride(1), a.size(2), a.size(1) // nslice, nslice,
                    *(args[i].data_ptr() for i in range(5)))
        self.round_out = 1 if round_out else 0
        self.width = a.size(1)

    def __call__(self, y: torch.Tensor, x: torch.Tensor, rows_ptr: int, seg_ptr: int, nseg: int,
                 scale: float) -> None:
        buf_ptr, _ = scratch(x.size(0) * self.width)
        self.fn(y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), *self.mid, rows_ptr, seg_ptr, nseg,
                scale, buf_ptr, self.width, self.round_out)


def load(strict: bool = False) -> CpuKernels | None:
    """The kernels for this process (built on first use), or None where they cannot be had:
    `LORALOOP_CPU_KERNELS=0`, no compiler, a failed build. `strict` raises KernelBuildError
    instead of returning None (tests)."""
    global _loaded, _tried
    with _lock:
        if _loaded is not None or (_tried and not strict):
            return _loaded
        _tried = True
        if os.environ.get(ENV_SWITCH, "1") == "0":
            if strict:
                raise KernelBuildError(f"{ENV_SWITCH}=0")
            return None
        try:
            _loaded = CpuKernels(build())
        except (KernelBuildError, OSError) as e:
            if strict:
                raise KernelBuildError(str(e)) from e
            log.warning("CPU LoRA kernels unavailable, mixed-adapter batches use torch ops: %s", e)
            return None
        log.debug("CPU LoRA kernels loaded from %s (%s)", _loaded.path, _loaded.isa)
        return _loaded


def loaded() -> CpuKernels | None:
    """What load() produced, without trying (None before load() or after it failed)."""
    return _loaded
