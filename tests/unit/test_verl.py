"""verl command lines for `loraloop up` (services/verl.py): the LoRA guide's reference command
translates key by key, the printed TOML is the config that runs, and anything that cannot be
translated fails by name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.common.config import load_config
from services.stack import load_stack_config, model_in_shm
from services.stack_config import StackConfig
from services.verl import VerlError, parse_value, split_command, translate

# The reference command of verl's "RL(HF) algorithms with LoRA Support" page, as verl's
# example scripts write it (backslash continuations).
REFERENCE = """python3 -m verl.trainer.main_ppo \\
    data.train_batch_size=64 actor_rollout_ref.model.use_shm=True \\
    actor_rollout_ref.model.lora_rank=32 actor_rollout_ref.model.lora_alpha=32 \\
    actor_rollout_ref.model.target_modules=all-linear actor_rollout_ref.actor.optim.lr=3e-5 \\
    actor_rollout_ref.actor.fsdp_config.fsdp_size=8 actor_rollout_ref.actor.fsdp_config.param_offload=True \\
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=True \\
    actor_rollout_ref.rollout.tensor_model_parallel_size=8 actor_rollout_ref.rollout.name=vllm \\
    actor_rollout_ref.rollout.gpu_memory_utilization=0.4 actor_rollout_ref.rollout.n=5 \\
    actor_rollout_ref.rollout.max_num_seqs=64 actor_rollout_ref.rollout.max_model_len=1536 \\
    actor_rollout_ref.rollout.max_num_batched_tokens=1536 actor_rollout_ref.rollout.load_format=safetensors \\
    actor_rollout_ref.rollout.layered_summon=True actor_rollout_ref.ref.fsdp_config.param_offload=True \\
    actor_rollout_ref.actor.ulysses_sequence_parallel_size=1
"""


def _cfg(text: str, *extra: str) -> StackConfig:
    t = translate(split_command(text))
    from services.common.config import merge, parse_overrides
    from services.stack_config import ALIASES

    return load_config(StackConfig, None, merge(t.overrides, parse_overrides(list(extra), ALIASES)))


def test_the_reference_command_translates_every_key():
    t = translate(split_command(REFERENCE))
    cfg = _cfg(REFERENCE)
    lm, algo, data, eng = cfg.learner.model, cfg.learner.algo, cfg.learner.data, cfg.rollout.engine
    assert (data.groups_per_step, data.samples_per_group) == (64, 5)
    assert (lm.lora_rank, lm.lora_alpha, lm.target_modules, lm.cpu_offload) == (32, 32.0, "all-linear", True)
    assert algo.lr == 3e-5 and cfg.learner.nproc == 8
    assert (eng.tensor_parallel_size, eng.gpu_memory_utilization, eng.max_num_seqs) == (8, 0.4, 64)
    assert (eng.max_model_len, eng.max_num_batched_tokens, eng.max_lora_rank) == (1536, 1536, 32)
    assert cfg.model_shm is True
    # verl's dtypes: vLLM in bf16, the actor fp32 with bf16 compute.
    assert eng.dtype == "bfloat16" and lm.mixed_precision is True and lm.dtype == "float32"
    # Where the command says nothing: loraloop's generic defaults, not the tiny demo's.
    from services.learner.config import LearnerConfig

    generic = LearnerConfig()
    assert (algo.micro_batch_size, algo.log_kl_every, data.lease_deadline_s, cfg.learner.checkpoint.every) == (
        generic.algo.micro_batch_size, generic.algo.log_kl_every, generic.data.lease_deadline_s,
        generic.checkpoint.every)
    assert algo.micro_batch_size != 256  # the demo's
    # verl's defaults where ours differ and the update changes: dual clip at 3, no KL loss.
    assert algo.dual_clip_c == 3.0 and algo.kl_coef == 0.0 and not algo.kl_in_reward
    notes = "\n".join(t.notes)
    for key in ("layered_summon", "load_format=safetensors", "ref.fsdp_config.param_offload",
                "ulysses_sequence_parallel_size=1", "rollout.name=vllm"):
        assert key in notes
    assert "reference policy is the base model" in notes


def test_print_config_prints_the_toml_that_is_run(tmp_path: Path, capsys):
    f = tmp_path / "cmd.sh"
    f.write_text(REFERENCE)
    cfg, only = load_stack_config(["--verl-file", str(f), "--learner.nproc=1", "--print-config"])
    assert only and cfg.learner.nproc == 1  # a flag after the verl keys wins
    out = capsys.readouterr().out
    assert out.startswith("# ") and "layered_summon" in out.splitlines()[0] + out
    printed = tmp_path / "printed.toml"
    printed.write_text(out)
    assert load_config(StackConfig, printed).model_dump() == cfg.model_dump()


def test_unknown_keys_and_unsupported_values_fail_by_name():
    with pytest.raises(VerlError) as e:
        translate(split_command("actor_rollout_ref.model.lora_rnak=8 trainer.foo=1 "
                                "actor_rollout_ref.rollout.name=sglang "
                                "actor_rollout_ref.actor.loss_agg_mode=seq-sum "
                                "actor_rollout_ref.actor.kl_loss_type=full algorithm.adv_estimator=remax "
                                "actor_rollout_ref.model.lora_rank=0"))
    msg = str(e.value)
    for name in ("actor_rollout_ref.model.lora_rnak: unknown verl key", "trainer.foo: unknown verl key",
                 "rollout.name=sglang", "loss_agg_mode=seq-sum", "kl_loss_type=full", "adv_estimator=remax",
                 "lora_rank=0"):
        assert name in msg, name
    with pytest.raises(SystemExit, match="unknown verl key"):
        load_stack_config(["--verl", "nope.key=1"])
    with pytest.raises(SystemExit, match="no-such-file"):
        load_stack_config(["--verl-file", "/no-such-file"])


def test_grpo_and_ppo_keys():
    cfg = _cfg("algorithm.adv_estimator=grpo actor_rollout_ref.actor.use_kl_loss=True "
               "actor_rollout_ref.actor.kl_loss_coef=0.01 actor_rollout_ref.actor.kl_loss_type=low_var_kl "
               "actor_rollout_ref.actor.clip_ratio_low=0.2 actor_rollout_ref.actor.clip_ratio_high=0.28 "
               "actor_rollout_ref.actor.clip_ratio_c=10.0 actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean "
               "actor_rollout_ref.actor.entropy_coeff=0.001 data.train_batch_size=32 "
               "actor_rollout_ref.actor.ppo_mini_batch_size=8 actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 "
               "actor_rollout_ref.actor.ppo_epochs=2 trainer.total_training_steps=50 trainer.save_freq=-1 "
               "data.max_prompt_length=512 data.max_response_length=256 "
               "custom_reward_function.path=/r/my_reward.py custom_reward_function.name=score "
               "trainer.n_gpus_per_node=4 trainer.nnodes=2 trainer.experiment_name=exp1")
    a, d = cfg.learner.algo, cfg.learner.data
    assert (a.kl_coef, a.kl_type, a.kl_in_reward) == (0.01, "k3", False)
    assert (a.clip_low, a.clip_high, a.dual_clip_c) == (0.2, 0.28, 10.0)
    assert (a.loss_agg, a.entropy_coef, a.mini_batches, a.micro_batch_size, a.ppo_epochs) == (
        "seq-mean-token-mean", 0.001, 4, 4, 2)
    assert cfg.learner.steps == 50 and cfg.learner.checkpoint.every == 10**9
    assert d.max_tokens == 256 and cfg.rollout.engine.max_model_len == 768
    assert d.reward_fn == "my_reward:score" and cfg.python_path == ["/r"]
    assert cfg.learner.nproc == 8 and cfg.run_dir == "runs/exp1"
    kl = _cfg("algorithm.use_kl_in_reward=True algorithm.kl_ctrl.kl_coef=0.005 algorithm.kl_penalty=kl")
    assert (kl.learner.algo.kl_in_reward, kl.learner.algo.kl_coef, kl.learner.algo.kl_type) == (True, 0.005, "k1")
    ad = _cfg("algorithm.use_kl_in_reward=True algorithm.kl_ctrl.type=adaptive algorithm.kl_ctrl.target_kl=0.1 "
              "algorithm.kl_ctrl.horizon=10000").learner.algo
    assert (ad.kl_ctrl, ad.kl_target, ad.kl_horizon, ad.kl_coef, ad.kl_in_reward) == ("adaptive", 0.1, 10000, 0.001, True)
    with pytest.raises(SystemExit, match="kl_ctrl = adaptive needs"):  # verl applies it to the in-reward KL only
        _cfg("algorithm.kl_ctrl.type=adaptive algorithm.kl_ctrl.target_kl=0.1")
    assert _cfg("algorithm.norm_adv_by_std_in_grpo=False").learner.algo.advantage == "dr_grpo"
    assert _cfg("actor_rollout_ref.actor.clip_ratio=0.3").learner.algo.clip_high == 0.3
    for verl_kl, ours in (("low_var_kl+", "k3+"), ("kl+", "k1+"), ("abs", "abs"), ("mse+", "k2")):
        assert _cfg(f"actor_rollout_ref.actor.kl_loss_type={verl_kl}").learner.algo.kl_type == ours
    assert _cfg("actor_rollout_ref.actor.loss_agg_mode=token-sum").learner.algo.loss_agg == "token-sum"
    bf = _cfg("actor_rollout_ref.actor.fsdp_config.model_dtype=bf16 actor_rollout_ref.rollout.dtype=float32")
    assert (bf.learner.model.dtype, bf.learner.model.mixed_precision, bf.rollout.engine.dtype) == (
        "bfloat16", False, "float32")
    for bad, why in (("actor_rollout_ref.actor.use_kl_loss=True algorithm.use_kl_in_reward=True", "choose one"),
                     ("data.train_batch_size=30 actor_rollout_ref.actor.ppo_mini_batch_size=8", "not a multiple"),
                     ("trainer.n_gpus_per_node=2 actor_rollout_ref.actor.fsdp_config.fsdp_size=4", "fsdp_size=4"),
                     ("algorithm.kl_ctrl.type=pid", "kl_ctrl.type"),
                     ("actor_rollout_ref.rollout.val_kwargs.do_sample=True", "temperature > 0"),
                     ("data.val_files=[a.jsonl,b.jsonl]", "one validation file")):
        with pytest.raises(VerlError, match=why):
            translate(split_command(bad))


def test_validation_keys_follow_verls_trainer():
    """data.val_files + trainer.test_freq: a round before training (val_before_train, on by
    default), every test_freq steps and at the end; greedy unless val_kwargs.do_sample."""
    v = _cfg("data.val_files=/d/test.parquet trainer.test_freq=5").learner.validation
    assert (v.dataset, v.every, v.before_train, v.at_end, v.greedy, v.samples) == ("/d/test.parquet", 5, True, True,
                                                                                   True, 4)
    v = _cfg("data.val_files=/d/test.parquet trainer.test_freq=-1 trainer.val_before_train=False").learner.validation
    assert (v.every, v.at_end, v.before_train) == (0, False, False)
    v = _cfg("data.val_files=/d/t.jsonl actor_rollout_ref.rollout.val_kwargs.do_sample=False").learner.validation
    assert (v.greedy, v.samples) == (True, 0)
    v = _cfg("data.val_files=/d/t.jsonl actor_rollout_ref.rollout.val_kwargs.do_sample=True "
             "actor_rollout_ref.rollout.val_kwargs.n=8 actor_rollout_ref.rollout.val_kwargs.temperature=0.6 "
             "actor_rollout_ref.rollout.val_kwargs.top_p=0.9").learner.validation
    assert (v.greedy, v.samples, v.temperature, v.top_p) == (False, 8, 0.6, 0.9)
    t = translate(split_command("trainer.test_freq=5"))
    assert any("no data.val_files" in n for n in t.notes)
    assert _cfg("trainer.test_freq=5").learner.validation.dataset == ""


def test_total_epochs_count_the_training_file(tmp_path: Path):
    f = tmp_path / "train.jsonl"
    f.write_text("".join('{"prompt": "1+1=", "answer": "2"}\n' for _ in range(100)))
    cfg = _cfg(f"data.train_files={f} data.train_batch_size=32 trainer.total_epochs=3")
    assert cfg.learner.data.dataset == str(f) and cfg.learner.steps == 3 * 3  # 100 // 32 batches an epoch
    with pytest.raises(VerlError, match="total_epochs"):
        translate(split_command("trainer.total_epochs=3"))


def test_command_line_syntax():
    pairs = split_command("# a comment\npython3 -m verl.trainer.main_ppo \\\n  +trainer.nnodes=1 \\\n"
                          "  'trainer.experiment_name=a b'  # trailing comment\n ++data.seed=3")
    assert pairs == [("trainer.nnodes", "1"), ("trainer.experiment_name", "a b"), ("data.seed", "3")]
    assert parse_value("True") is True and parse_value("null") is None and parse_value("[q_proj,v_proj]") == [
        "q_proj", "v_proj"] and parse_value("3e-5") == 3e-5 and parse_value("all-linear") == "all-linear"
    with pytest.raises(VerlError, match=r"\$LR"):
        split_command("actor_rollout_ref.actor.optim.lr=$LR")
    with pytest.raises(VerlError, match="oops"):
        split_command("data.seed=1 oops")


def test_use_shm_copies_once_reuses_and_falls_back(tmp_path: Path, monkeypatch, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(os.urandom(4096))
    root = tmp_path / "shm"
    root.mkdir()
    first = model_in_shm(model, root)
    assert first != model and (first / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    assert model_in_shm(model, root) == first and "reusing" in capsys.readouterr().out
    (model / "config.json").write_text('{"changed": 1}')  # a changed model is copied again
    second = model_in_shm(model, root)
    assert (second / "config.json").read_text() == '{"changed": 1}'
    assert model_in_shm(model, tmp_path / "no-shm") == model
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 100})())
    (model / "config.json").write_text('{"changed": 2}')
    assert model_in_shm(model, root) == model and "does not fit" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["qwen2.5-72b-lora-8x80gb.sh", "qwen2.5-3b-gsm8k-lora.sh"])
def test_the_examples_translate(name: str, tmp_path: Path):
    """examples/verl: each command translates whole (the training file swapped for a local one,
    since total_epochs counts its rows)."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join('{"prompt": "q", "answer": "a", "data_source": "openai/gsm8k"}\n' for _ in range(7473)))
    text = (Path(__file__).resolve().parents[2] / "examples" / "verl" / name).read_text()
    cfg = _cfg(text.replace("/data/gsm8k/train.parquet", str(data)))
    assert cfg.learner.data.dataset == str(data) and cfg.learner.data.reward_fn == "by_data_source"
    assert cfg.model.startswith("/models/Qwen2.5-") and cfg.model_shm
    if "3b" in name:
        a = cfg.learner.algo
        assert (cfg.learner.model.lora_rank, a.kl_coef, a.kl_type, a.mini_batches) == (64, 0.001, "k3", 1)
        assert cfg.learner.steps == 15 * (7473 // 16) and cfg.rollout.engine.tensor_parallel_size == 2
        assert cfg.rollout.engine.max_model_len == 512 + 1024
        v = cfg.learner.validation
        assert (v.dataset, v.every, v.before_train, v.at_end) == ("/data/gsm8k/test.parquet", 5, True, True)
    else:
        assert cfg.learner.nproc == 8 and cfg.learner.model.cpu_offload and cfg.learner.steps == 500
