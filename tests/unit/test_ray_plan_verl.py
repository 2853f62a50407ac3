"""The Ray launcher takes a verl command line too (`--verl-file`): its learner and rollout
settings, under the launcher's own --learner./--rollout. flags (no Ray started here)."""

from __future__ import annotations

from pathlib import Path

from deploy.ray.plan import make_plan, parser
from tests.unit.test_verl import REFERENCE


def test_ray_plan_applies_a_verl_command_under_its_own_flags(tmp_path: Path, capsys):
    f = tmp_path / "verl.sh"
    f.write_text(REFERENCE)
    args, extra = parser().parse_known_args(["--model", str(tmp_path), "--run-dir", str(tmp_path / "run"),
                                             "--verl-file", str(f), "--rollout.engine.max_num_seqs=32"])
    plan = make_plan(args, extra)
    assert plan.learner["model"]["lora_rank"] == 32 and plan.learner["algo"]["lr"] == 3e-5
    assert plan.learner["data"]["samples_per_group"] == 5 and plan.learner["model"]["path"] == str(tmp_path)
    assert plan.learner["nproc"] == 1  # --learner-nproc decides the ranks on Ray
    assert plan.rollout["engine"]["max_num_seqs"] == 32  # the flag wins over the command's 64
    assert plan.rollout["engine"]["tensor_parallel_size"] == 8 and plan.rollout["engine"]["max_lora_rank"] == 32
    out = capsys.readouterr().out
    assert "verl: rollout.layered_summon" in out and "model_shm is a `loraloop up` setting" in out
    assert "learner ranks are --learner-nproc here (1); the command asked for 8" in out
