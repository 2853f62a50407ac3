"""Config loading: defaults < TOML < dotted overrides; every config file in the repo parses."""

from pathlib import Path

import pytest

from services.broker.config import ALIASES, BrokerConfig
from services.common.config import AuthConfig, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[2]


def test_overrides_are_dotted_and_typed():
    got = parse_overrides(["--server.port=7", "--redis-url", "redis://h:1/0", "--auth.enabled=false",
                           "--registry.keep_last", "3", "--flag"], ALIASES)
    assert got == {"server": {"port": 7}, "redis": {"url": "redis://h:1/0"}, "auth": {"enabled": False},
                   "registry": {"keep_last": 3}, "flag": True}
    assert parse_overrides(["--server.host=127.0.0.1"]) == {"server": {"host": "127.0.0.1"}}


def test_file_then_overrides(tmp_path):
    f = tmp_path / "b.toml"
    f.write_text('[server]\nport = 6000\nhost = "0.0.0.0"\n[registry]\nkeep_last = 4\n')
    cfg = load_config(BrokerConfig, f, parse_overrides(["--port=6001"], ALIASES))
    assert (cfg.server.port, cfg.server.host, cfg.registry.keep_last) == (6001, "0.0.0.0", 4)
    assert cfg.redis.durability == "require"  # untouched default


@pytest.mark.parametrize("over,msg", [
    (["--registry.keep_last=0"], "registry.keep_last"),
    (["--server.nope=1"], "server.nope"),
    (["--redis.durability=maybe"], "redis.durability"),
])
def test_bad_values_name_the_field(over, msg):
    with pytest.raises(SystemExit, match=msg):
        load_config(BrokerConfig, None, parse_overrides(over))


def test_missing_file_is_a_clear_error():
    with pytest.raises(SystemExit, match="config file not found"):
        load_config(BrokerConfig, "/nonexistent.toml")


def test_tokens_from_env(monkeypatch):
    monkeypatch.setenv("LORALOOP_TOKENS", "learner:a, rollout:b,client:c")
    assert AuthConfig().token_roles() == {"a": "learner", "b": "rollout", "c": "client"}
    monkeypatch.setenv("LORALOOP_TOKENS", "admin:x")
    with pytest.raises(ValueError, match="role:token"):
        AuthConfig().token_roles()


def _config_files():
    skip = {"pyproject.toml"}
    return [p for p in REPO.rglob("*.toml") if p.name not in skip and ".git" not in p.parts
            and "build" not in p.parts]


def _model_for(path: Path):
    # A config file says which command it is for by its name (broker*.toml, learner*.toml,
    # rollout*.toml); other files in examples/ are `loraloop up` stack configs.
    from services.broker.config import BrokerConfig as Broker
    from services.learner.config import LearnerConfig
    from services.rollout.config import RolloutConfig
    from services.stack_config import StackConfig

    models = {"broker": Broker, "learner": LearnerConfig, "rollout": RolloutConfig}
    for prefix, model in models.items():
        if path.name.startswith(prefix):
            return model
    return StackConfig if "examples" in path.parts else None


def test_every_config_file_in_the_repo_parses():
    files = _config_files()
    assert files, "no config files found"
    for f in files:
        model = _model_for(f)
        assert model is not None, f"{f}: no config model claims this file (name it after its command)"
        load_config(model, f)


def test_to_toml_round_trips_a_service_config(tmp_path):
    from services.common.config import to_toml
    from services.learner.config import LearnerConfig

    cfg = LearnerConfig(run_dir='runs/a "quoted" \\ dir', steps=7)
    cfg.algo.dual_clip_c = None
    f = tmp_path / "learner.toml"
    f.write_text(to_toml(cfg.model_dump()))
    assert load_config(LearnerConfig, f) == cfg


def test_to_toml_round_trips_lists_of_sections(tmp_path):
    from services.common.config import to_toml
    from services.rollout.config import RolloutConfig

    cfg = RolloutConfig(learner="h:1", learners=[{"address": "h:2", "weight": 3.0}, {"address": "h:3"}])
    f = tmp_path / "rollout.toml"
    f.write_text(to_toml(cfg.model_dump()))
    assert "[[learners]]" in f.read_text()
    assert load_config(RolloutConfig, f) == cfg


def test_stack_runs_are_the_learner_with_each_runs_changes():
    from services.stack_config import StackConfig

    cfg = StackConfig.model_validate({
        "learner": {"steps": 50, "model": {"lora_rank": 16}},
        "runs": [{"learner": {"adapter_name": "a"}},
                 {"weight": 2, "learner": {"adapter_name": "b", "model": {"lora_rank": 8}}}]})
    (a, wa), (b, wb) = cfg.run_learners()
    assert (a.adapter_name, a.steps, a.model.lora_rank, wa) == ("a", 50, 16, 1.0)
    assert (b.adapter_name, b.steps, b.model.lora_rank, wb) == ("b", 50, 8, 2.0)
    assert [lc.adapter_name for lc, _ in StackConfig().run_learners()] == ["policy"]  # no [[runs]]: one run
    with pytest.raises(ValueError, match=r"its own learner\.adapter_name"):
        StackConfig.model_validate({"runs": [{"learner": {}}, {"learner": {}}]})
    with pytest.raises(ValueError, match=r"runs\[1\].learner.model.lora_rank"):
        StackConfig.model_validate({"runs": [{"learner": {"adapter_name": "a"}},
                                             {"learner": {"adapter_name": "b", "model": {"lora_rank": 0}}}]})


def test_examples_two_runs_loads():
    from services.stack_config import StackConfig

    cfg = load_config(StackConfig, Path(__file__).resolve().parents[2] / "examples" / "two-runs.toml")
    runs = cfg.run_learners()
    assert [lc.adapter_name for lc, _ in runs] == ["add-r16", "add-r8"]
    assert runs[0][0].model.target_modules != runs[1][0].model.target_modules
    assert cfg.rollout_replicas == 2


def test_a_partial_learner_or_rollout_keeps_the_stack_defaults():
    """`loraloop up --learner.steps=30` changes the steps only: the rest of [learner] stays the
    demo's (it used to fall back to LearnerConfig's generic defaults: micro-batch 64, the KL
    metric's forward every step, a checkpoint every 10 steps)."""
    from services.common.config import load_config, parse_overrides
    from services.stack_config import ALIASES, DEMO_LEARNER, DEMO_ROLLOUT, StackConfig

    cfg = load_config(StackConfig, None, parse_overrides(["--learner.steps=30", "--rollout.log_level=DEBUG"], ALIASES))
    assert cfg.learner.steps == 30 and cfg.rollout.log_level == "DEBUG"
    assert cfg.learner.model_copy(update={"steps": DEMO_LEARNER.steps}) == DEMO_LEARNER
    assert cfg.rollout.model_copy(update={"log_level": DEMO_ROLLOUT.log_level}) == DEMO_ROLLOUT
    assert (cfg.learner.algo.micro_batch_size, cfg.learner.algo.log_kl_every, cfg.learner.checkpoint.every) == (
        256, 10, 20)
