"""`loraloop adapters push|list|show|pull|pin|unpin` against a real broker; the pulled
directory is a standard PEFT adapter directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.adapters import make_adapter
from tests.support.procs import TOKENS


def _cli(broker, *args: str, token: str = TOKENS["learner"]) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORALOOP_TOKEN": token, "LORALOOP_BROKER": broker.target}
    return subprocess.run([sys.executable, "-m", "services.cli", "adapters", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def _write_peft_dir(d: Path, seed: int) -> bytes:
    cfg, data = make_adapter(seed=seed)
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    (d / "adapter_model.safetensors").write_bytes(data)
    return data


def test_push_list_show_pull_pin(broker, tmp_path):
    data = _write_peft_dir(tmp_path / "a1", 1)
    _write_peft_dir(tmp_path / "a2", 2)
    fp = "sha256:" + "12" * 32
    for d in ("a1", "a2"):
        out = _cli(broker, "push", str(tmp_path / d), "--name", "demo", "--base-fingerprint", fp)
        assert out.returncode == 0, out.stderr
    assert "published demo@v2" in out.stdout
    out = _cli(broker, "list", token=TOKENS["client"])
    assert out.returncode == 0 and "demo" in out.stdout and "v2" in out.stdout
    out = _cli(broker, "list", "demo", token=TOKENS["client"])
    assert "v1" in out.stdout and "latest: v2" in out.stdout
    shown = json.loads(_cli(broker, "show", "demo@v1", token=TOKENS["client"]).stdout)
    assert shown["version"] == 1 and shown["base_model_fingerprint"] == fp and shown["rank"] == 4
    out = _cli(broker, "pull", "demo@v1", str(tmp_path / "pulled"), token=TOKENS["client"])
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "pulled" / "adapter_model.safetensors").read_bytes() == data
    assert json.loads((tmp_path / "pulled" / "adapter_config.json").read_text())["r"] == 4
    assert _cli(broker, "pin", "demo@v1").returncode == 0
    assert "*" in _cli(broker, "list", "demo").stdout
    assert _cli(broker, "unpin", "demo@v1").returncode == 0


def test_cli_errors_are_clear(broker, tmp_path):
    out = _cli(broker, "show", "demo@v9", token=TOKENS["client"])
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr and "Traceback" not in out.stderr
    _write_peft_dir(tmp_path / "a", 1)
    out = _cli(broker, "push", str(tmp_path / "a"), "--name", "x", "--base-fingerprint", "f",
               token=TOKENS["client"])
    assert out.returncode == 1 and "PERMISSION_DENIED" in out.stderr
    out = _cli(broker, "pull", "../etc@v1", str(tmp_path / "p"), token=TOKENS["client"])
    assert out.returncode == 1 and "invalid adapter name" in out.stderr
