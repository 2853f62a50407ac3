"""The TRL peer's own logic, without TRL or a venv: its copy of the arithmetic reward agrees
with loraloop's, its arguments and batch mapping, and the venv marker's idempotence."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from services.bench import peer_env
from services.rollout.rewards import arithmetic_exact

SCRIPT = Path(peer_env.__file__).with_name("trl_peer.py")


@pytest.fixture(scope="module")
def peer() -> ModuleType:
    """trl_peer.py loaded by path, as a file (it is a standalone script in the TRL venv)."""
    spec = importlib.util.spec_from_file_location("trl_peer_under_test", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_imports_nothing_heavy_or_ours_at_module_level(peer: ModuleType):
    heavy = {"torch", "transformers", "peft", "trl", "datasets", "services"}
    assert not heavy & {name.split(".")[0] for name, v in vars(peer).items() if isinstance(v, ModuleType)}


@pytest.mark.parametrize("text, truth", [
    ("11", "11"), ("05", "05"), ("5", "05"), ("11<eos>", "11"), ("11<eos>99", "11"), ("<eos>11", "11"),
    ("<bos>11<pad>", "11"), (" 11 \n", "11"), ("<pad> <bos>11", "11"), ("111", "11"), ("", "00"),
    ("1 1", "11"), ("11", " 11 "), ("<pad><pad>", ""), ("12", "11"),
])
def test_reward_agrees_with_loraloop(peer: ModuleType, text: str, truth: str):
    assert peer.arithmetic_exact("arithmetic", text, truth) == arithmetic_exact("arithmetic", text, truth)


def test_arguments_defaults_and_checks(peer: ModuleType):
    a = peer.parse_args(["--model", "m", "--prompts", "p.jsonl", "--out", "o.jsonl"])
    assert (a.steps, a.prompts_per_step, a.samples, a.max_new_tokens, a.min_new_tokens) == (20, 32, 8, 3, 0)
    assert (a.temperature, a.lr, a.lora_rank, a.lora_alpha, a.target_modules) == (1.0, 1e-3, 16, 32.0, "all-linear")
    assert (a.threads, a.seed, a.micro_batch) == (2, 0, 64)
    a = peer.parse_args(["--model", "m", "--prompts", "p", "--out", "o", "--prompts-per-step", "2",
                         "--samples", "4"])
    assert a.micro_batch == 8  # capped at the step's batch
    for bad in (["--samples", "1"], ["--min-new-tokens", "4"], ["--micro-batch", "48"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            peer.parse_args(["--model", "m", "--prompts", "p", "--out", "o", *bad])
    with pytest.raises(SystemExit):
        peer.parse_args([])  # --model, --prompts and --out are required


def test_help_answers(peer: ModuleType, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as e:
        peer.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--min-new-tokens" in out and "--prompts-per-step" in out


def test_one_optimizer_step_per_generation_batch(peer: ModuleType):
    bc = peer.batch_config(32, 8, 64)
    assert bc == {"per_device_train_batch_size": 64, "gradient_accumulation_steps": 4,
                  "steps_per_generation": 4, "num_generations": 8}
    # TRL's generation batch (per device x steps_per_generation) is the step's whole batch.
    assert bc["per_device_train_batch_size"] * bc["steps_per_generation"] == 32 * 8
    with pytest.raises(ValueError):
        peer.batch_config(32, 8, 48)


def test_read_prompts(peer: ModuleType, tmp_path: Path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "3+8=", "ground_truth": "11"}\n\n{"prompt": "2+3=", "ground_truth": "05"}\n')
    assert [r["ground_truth"] for r in peer.read_prompts(f)] == ["11", "05"]
    f.write_text('{"prompt": ["x"], "ground_truth": "11"}\n')
    with pytest.raises(ValueError):
        peer.read_prompts(f)


class FakePip:
    """Stands in for `peer_env._run`: records commands, makes `python -m venv` leave a
    bin/python behind and the import check print versions."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, cmd, timeout_s: float, label: str) -> str:
        self.calls.append(list(cmd))
        if cmd[1:3] == ["-m", "venv"]:
            python = Path(cmd[3]) / "bin" / "python"
            python.parent.mkdir(parents=True)
            python.write_text("")
        if cmd[1] == "-c":
            return json.dumps({"torch": "2.13.0+cpu", "trl": "1.16.0"})
        return ""


def test_venv_is_built_once_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake = FakePip()
    monkeypatch.setattr(peer_env, "_run", fake)
    venv = tmp_path / "peer-trl"
    python = peer_env.ensure_trl_venv(venv, timeout_s=60)
    assert python == venv / "bin" / "python"
    install = next(c for c in fake.calls if "install" in c)
    # torch pinned in the very command that resolves TRL's dependencies
    assert peer_env.TORCH_SPEC in install and peer_env.TRL_SPEC in install
    assert any("uninstall" in c and "torchvision" in c for c in fake.calls)
    assert peer_env.peer_versions(venv)["trl"] == "1.16.0"
    n = len(fake.calls)
    assert peer_env.ensure_trl_venv(venv, timeout_s=60) == python
    assert len(fake.calls) == n  # the marker answered; nothing ran

    # Other requirements than the marker's: reinstalled into the same venv (not recreated).
    monkeypatch.setattr(peer_env, "PEER_REQUIREMENTS", (*peer_env.PEER_REQUIREMENTS, "extra-package"))
    peer_env.ensure_trl_venv(venv, timeout_s=60)
    new = fake.calls[n:]
    assert not any(c[1:3] == ["-m", "venv"] for c in new) and any("extra-package" in c for c in new)


def test_failed_install_leaves_no_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake = FakePip()

    def failing(cmd, timeout_s: float, label: str) -> str:
        fake(cmd, timeout_s, label)
        if "install" in cmd:
            raise RuntimeError("pip install failed (exit 1)\nlast output:\nERROR: no matching distribution")
        return ""

    monkeypatch.setattr(peer_env, "_run", failing)
    with pytest.raises(RuntimeError, match="no matching distribution"):
        peer_env.ensure_trl_venv(tmp_path / "v", timeout_s=60)
    assert not (tmp_path / "v" / peer_env.MARKER).exists()


def test_run_reports_a_failing_command_with_its_output():
    with pytest.raises(RuntimeError, match="boom"):
        peer_env._run([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 30, "test")
    with pytest.raises(RuntimeError, match="did not finish"):
        peer_env._run([sys.executable, "-c", "import time; time.sleep(30)"], 1, "test")


def test_peer_env_keeps_our_packages_out(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PYTHONPATH", "/work/main")
    env = peer_env.peer_env(threads=3)
    assert "PYTHONPATH" not in env and env["OMP_NUM_THREADS"] == "3" and env["HF_HUB_OFFLINE"] == "1"


FAKE_PEER = """
import argparse, json, os, sys
p = argparse.ArgumentParser()
for a in ("--model", "--prompts", "--out", "--steps", "--threads", "--samples"):
    p.add_argument(a)
a = p.parse_args()
assert "PYTHONPATH" not in os.environ and os.environ["OMP_NUM_THREADS"] == a.threads
with open(a.out, "w") as f:
    for s in range(1, int(a.steps) + 1):
        f.write(json.dumps({"step": s, "time": s * 0.1, "step_s": 0.1, "reward_mean": 0.2}) + "\\n")
        print(f"trl-peer step {s}/{a.steps} time {s * 0.1:.2f} s step_s 0.100 reward 0.200", flush=True)
    if a.samples != "0":
        f.write(json.dumps({"summary": True, "steps": int(a.steps), "samples": a.samples,
                            "affinity": sorted(os.sched_getaffinity(0))}) + "\\n")
"""


def test_run_trl_reads_rows_pins_cpus_and_prints_every_tenth_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    script = tmp_path / "fake_peer.py"
    script.write_text(FAKE_PEER)
    monkeypatch.setattr(peer_env, "SCRIPT", script)
    monkeypatch.setenv("PYTHONPATH", "/nowhere")
    cpu = min(os.sched_getaffinity(0))
    rows = peer_env.run_trl(Path(sys.executable), tmp_path / "model", tmp_path / "p.jsonl", tmp_path / "o.jsonl",
                            steps=25, threads=1, extra_args=["--samples", "8"], cpus={cpu}, timeout_s=60)
    assert len(rows) == 26 and rows[-1]["summary"] and rows[-1]["samples"] == "8"
    assert rows[-1]["affinity"] == [cpu]
    printed = [line.split()[2] for line in capsys.readouterr().out.splitlines() if "trl-peer step" in line]
    assert printed == ["10/25", "20/25", "25/25"]
    with pytest.raises(RuntimeError, match="no summary row"):
        peer_env.run_trl(Path(sys.executable), tmp_path / "model", tmp_path / "p.jsonl", tmp_path / "o.jsonl",
                         steps=2, threads=1, extra_args=["--samples", "0"], timeout_s=60)


def test_prefix_reward_agrees_with_loraloops(peer: ModuleType) -> None:
    from services.rollout.rewards import arithmetic_prefix

    mod = peer
    for text, truth in [("11<eos>7+2=09", "11"), ("<bos> 11 3+", "11"), ("1", "11"), ("x11", "11"),
                        ("05", "05"), ("5", "05"), ("", "00"), ("<pad>0912", "09")]:
        assert mod.arithmetic_prefix("arithmetic", text, truth) == arithmetic_prefix("arithmetic", text, truth), text
    assert mod.parse_args(["--model", "m", "--prompts", "p", "--out", "o", "--reward", "prefix"]).reward == "prefix"
