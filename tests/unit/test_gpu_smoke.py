"""tests/gpu/smoke.py without a GPU: it skips in one line, imports nothing the GPU image lacks,
and its stand-in settings are valid learner settings. (Its CPU mode under torchrun:
tests/integration/test_gpu_smoke_run.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gpu import smoke

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "gpu" / "smoke.py"


def test_without_a_gpu_it_prints_one_line_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("LOCAL_RANK", None)
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, env=env,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(smoke.SKIP), r.stdout
    assert "CUDA" in lines[0]


def test_its_modules_import_without_vllm_redis_grpc_or_pydantic():
    """As on the GPU image: each of them reads as not installed (None in sys.modules makes
    `import` fail and importlib.util.find_spec answer None)."""
    code = (
        "import sys\n"
        f"for m in {smoke.FORBIDDEN!r}: sys.modules[m] = None\n"
        "from tests.gpu import smoke\n"
        "import services.common.net\n"  # the launcher's free_port
        "mods = smoke.import_learner()\n"
        "assert not smoke.Settings(**smoke.ALGO).needs_critic\n"
        "mods['demo_batch'](groups=2, samples=2, prompt=3, response=2)\n"
        f"print(sorted(m for m in {smoke.FORBIDDEN!r} if sys.modules.get(m) is not None))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "[]"
    assert set(smoke.FORBIDDEN) >= {"vllm", "redis", "grpc"}


def test_its_settings_are_valid_learner_settings():
    from services.learner.config import AlgoConfig, ModelConfig

    algo = AlgoConfig(**smoke.ALGO).model_dump()
    assert {k: algo[k] for k in smoke.ALGO} == smoke.ALGO
    for offload in (False, True):
        m = smoke.model_settings("/models/x", "bfloat16", offload, True)
        assert {k: v for k, v in ModelConfig(**m).model_dump().items() if k in m} == m
    s = smoke.Settings(**smoke.ALGO)
    assert s.lr == smoke.ALGO["lr"] and s.model_dump() == smoke.ALGO
    with pytest.raises(AttributeError):
        _ = s.not_a_setting


def test_args_default_per_device():
    g = smoke.parse_args([])
    assert (g.device, g.nproc, g.shape, g.dtype, g.mixed_precision) == ("cuda", 1, "0.5b", "bfloat16", True)
    assert g.variants == ["plain", "offload"]
    c = smoke.parse_args(["--device", "cpu", "--steps", "1"])
    assert (c.shape, c.dtype, c.mixed_precision, c.steps) == ("tiny", "float32", False, 1)
    for bad in (["--variants", "zero"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            smoke.parse_args(bad)


def test_report_has_a_row_per_variant_with_gpu_memory_and_failures():
    v = {"variant": "plain", "offload": False, "backend": "nccl", "load_s": 3.0, "step_s_median": 0.25,
         "first_step_s": 1.5, "gather_s": 0.01, "write_s": 0.02, "adapter_mb": 33.8, "adapter_tensors": 336,
         "adapter": "/tmp/a/adapter_model.safetensors", "problems": [], "gpu_resident_mb": 1000.0,
         "gpu_peak_mb": 5000.0, "gpu_update_peak_mb": 4000.0}
    s = {"device": "NVIDIA H100", "world": 1, "shape": "0.5b", "dtype": "bfloat16", "mixed_precision": True,
         "lora": "r16 all-linear", "batch": {"rows": 64, "tokens": 256, "micro_batch": 16}, "steps": 4,
         "torch": "2.11", "imported": [],
         "variants": [v, {**v, "variant": "offload", "offload": True, "problems": ["unexpected tensor x"]}]}
    text = smoke.report(s)
    rows = {ln.split()[0]: ln.split() for ln in text.splitlines() if ln.split()[:1] in (["plain"], ["offload"])}
    assert rows["plain"][1:3] == ["no", "3.00"] and rows["plain"][-4:] == ["1000", "5000", "4000", "ok"]
    assert rows["offload"][1] == "yes" and rows["offload"][-1] == "FAIL"
    assert "FAIL: unexpected tensor x" in text and "NVIDIA H100" in text and "nccl" in text
