"""`loraloop up --write-configs DIR`: the services' TOMLs as `up` would start them, written
without starting anything (laid out as in the run dir; one learner file per run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.config import load_config
from services.learner.config import LearnerConfig
from services.rollout.config import RolloutConfig
from services.stack import main

ROOT = Path(__file__).resolve().parents[2]


def test_two_runs_each_learner_its_file_and_port(tmp_path: Path, capsys):
    out = tmp_path / "cfg"
    assert main([str(ROOT / "examples" / "two-runs.toml"), "--model", "/m", "--write-configs", str(out)]) == 0
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.toml"))
    assert files == ["add-r16/learner.toml", "add-r8/learner.toml", "broker.toml", "rollout.toml"]
    r16, r8 = (load_config(LearnerConfig, out / a / "learner.toml") for a in ("add-r16", "add-r8"))
    rc = load_config(RolloutConfig, out / "rollout.toml")
    assert (r16.server.port, r8.server.port) == (50053, 50054) and r16.seed != r8.seed
    assert [t.address for t in rc.learners] == ["127.0.0.1:50053", "127.0.0.1:50054"] and rc.learner == ""
    assert r16.model.path == r8.model.path == rc.engine.model == "/m"
    assert rc.engine.max_lora_rank >= max(r16.model.lora_rank, r8.model.lora_rank)
    assert rc.adapters.follow == ["add-r16", "add-r8"]
    assert "wrote" in capsys.readouterr().out


def test_needs_a_model(tmp_path: Path):
    with pytest.raises(SystemExit, match="needs a model"):
        main(["--write-configs", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs a directory"):
        main(["--write-configs"])
