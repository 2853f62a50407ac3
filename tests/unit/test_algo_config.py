"""The typed algorithm config against the algorithm registries: the Literal choices are the
registered names, `needs_critic` and each estimator's settings come from the registry, and
the trainer's row-sharding rule gives every row to exactly one rank and micro-batch."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch

from services.common.config import load_config, parse_overrides
from services.learner import algorithms as A
from services.learner.config import AdvantageName, AlgoConfig, KlName, LearnerConfig, LossAggName

REPO = Path(__file__).resolve().parents[2]


def test_the_literals_are_the_registered_names() -> None:
    # Adding an estimator (or mode) to a registry without its Literal, or the other way
    # round, fails here.
    assert sorted(get_args(AdvantageName)) == list(A.ADVANTAGE_ESTIMATORS.names())
    assert sorted(get_args(LossAggName)) == list(A.AGG_MODES.names())
    assert sorted(get_args(KlName)) == list(A.KL_ESTIMATORS.names())
    # The algorithms' own Literals name the same choices.
    assert set(get_args(A.AggMode)) == set(get_args(LossAggName))
    assert set(get_args(A.KlType)) == set(get_args(KlName))


def test_needs_critic_comes_from_the_registry() -> None:
    for name in get_args(AdvantageName):
        assert AlgoConfig(advantage=name).needs_critic is A.advantage_needs_values(name), name
    assert [n for n in get_args(AdvantageName) if AlgoConfig(advantage=n).needs_critic] == ["gae"]
    # A name set past validation still fails at the registry, with the valid names.
    with pytest.raises(A.UnknownName, match="dr_grpo, gae, grpo"):
        _ = AlgoConfig.model_construct(advantage="ppo").needs_critic


def test_each_estimator_takes_the_settings_its_signature_names() -> None:
    cfg = AlgoConfig(gamma=0.9, lam=0.8)
    got = {name: A.advantage_kwargs(name, cfg.model_dump()) for name in get_args(AdvantageName)}
    assert got == {
        "grpo": {},
        "dr_grpo": {},
        "rloo": {},
        "reinforce_plus_plus": {"gamma": 0.9},
        "reinforce_plus_plus_baseline": {"gamma": 0.9},
        "gae": {"gamma": 0.9, "lam": 0.8},
    }
    # Every option an estimator has beyond the config's has a default, so the trainer's call
    # (inputs plus the config's settings) is complete for every registered estimator.
    for name in A.ADVANTAGE_ESTIMATORS.names():
        params = inspect.signature(A.get_advantage_fn(name)).parameters.values()
        assert all(p.default is not p.empty for p in params if p.kind is p.KEYWORD_ONLY), name


@pytest.mark.parametrize(("over", "field"), [
    (["--algo.advantage=ppo"], "algo.advantage"),
    (["--algo.loss_agg=mean"], "algo.loss_agg"),
    (["--algo.kl_type=low_var_kl"], "algo.kl_type"),
])
def test_an_unknown_name_fails_when_the_config_loads(over: list[str], field: str) -> None:
    with pytest.raises(SystemExit, match=field):
        load_config(LearnerConfig, None, parse_overrides(over))


def test_dotted_overrides_set_the_gae_settings(tmp_path) -> None:
    f = tmp_path / "learner.toml"
    f.write_text('[algo]\nadvantage = "gae"\nloss_agg = "seq-mean-token-sum"\ngamma = 0.99\n')
    cfg = load_config(LearnerConfig, f, parse_overrides(["--algo.lam=0.95", "--algo.critic_lr=3e-4"]))
    assert (cfg.algo.advantage, cfg.algo.loss_agg, cfg.algo.gamma, cfg.algo.lam, cfg.algo.critic_lr) == (
        "gae", "seq-mean-token-sum", 0.99, 0.95, 3e-4)
    assert cfg.algo.needs_critic
    # needs_critic is a property, not a field: a dumped config loads back unchanged.
    assert "needs_critic" not in cfg.algo.model_dump()


def test_loading_a_learner_config_imports_no_torch() -> None:
    # needs_critic imports the algorithms on use only, so `--help` and loading stay fast.
    code = ("import sys; from services.common.config import load_config; "
            "from services.learner.config import LearnerConfig; "
            "load_config(LearnerConfig, None, {'algo': {'advantage': 'gae', 'lam': 0.95}}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize(("size", "world", "micro", "mini_batches"), [
    (32, 1, 64, 1), (32, 2, 3, 2), (9, 2, 2, 3), (7, 3, 1, 2), (5, 4, 2, 1),
])
def test_every_row_goes_to_one_rank_and_one_micro_batch(size: int, world: int, micro: int,
                                                        mini_batches: int) -> None:
    from services.learner.trainer import Rows

    rows = torch.arange(size)
    seen: list[int] = []
    for rank in range(world):
        r = Rows(rank, world, micro)
        shard = r.mine(rows)
        assert torch.equal(shard, rows[rank::world])  # Batch.shard's rule
        for chunk in torch.tensor_split(rows, mini_batches):
            local = r.local(chunk)
            assert torch.equal(shard[local], r.mine(chunk))  # local positions point at the chunk's rows
            parts = [local[s] for s in r.micro_batches(len(local))]
            assert all(0 < len(p) <= micro for p in parts)
            assert torch.equal(torch.cat(parts) if parts else local, local)
            seen += shard[local].tolist()
    assert sorted(seen) == rows.tolist()


def test_adaptive_kl_controller_arithmetic_and_settings():
    from services.learner.trainer import adaptive_kl_coef

    # 1 + clip(0.2 / 0.1 - 1 = 1, -0.2, 0.2) * 256 / 10000 = 1.00512
    assert adaptive_kl_coef(0.1, 0.2, 0.1, 256, 10000) == pytest.approx(0.1 * 1.00512, rel=1e-12)
    # 1 + (0.09 / 0.1 - 1 = -0.1) * 256 / 10000 = 0.99744
    assert adaptive_kl_coef(0.1, 0.09, 0.1, 256, 10000) == pytest.approx(0.1 * 0.99744, rel=1e-12)
    assert adaptive_kl_coef(0.1, 0.0, 0.1, 100, 100) == pytest.approx(0.08)  # clipped at -0.2
    with pytest.raises(ValueError, match="kl_ctrl = adaptive needs"):
        AlgoConfig(kl_ctrl="adaptive", kl_target=0.1, kl_coef=0.1)  # not in the reward
    AlgoConfig(kl_ctrl="adaptive", kl_target=0.1, kl_coef=0.1, kl_in_reward=True)
