"""verl command lines for `loraloop up`: `--verl "KEY=VALUE ..."` or `--verl-file FILE`.

A verl user's overrides (`python3 -m verl.trainer.main_ppo KEY=VALUE ...`, Hydra syntax) are
translated key by key into this project's stack config (`services.stack_config.StackConfig`).
Each key either sets loraloop settings, or is accepted with a note of what replaces it in
the decoupled design (the reference is the base with the adapter disabled; only LoRA tensors
are gathered to publish; weights are always safetensors), or is refused by name: an unknown
key, or a value we do not support, is an error, never silently ignored. `translate` returns
the overrides and the notes; every error of a command line is reported at once.

verl's own defaults apply to the algorithm keys a verl command line leaves out where they
differ from ours and change the update: the dual-clip constant (verl always clips negative
advantages at clip_ratio_c = 3), and no KL loss unless `use_kl_loss`. The rest of what a verl
run does not say takes loraloop's defaults, which the printed TOML shows.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_LAUNCHER = ("python", "python3", "-m", "verl.trainer.main_ppo", "verl.trainer.main_ppo_lora", "torchrun")


class VerlError(ValueError):
    """One or more keys of a verl command line cannot be translated (each named)."""


def split_command(text: str) -> list[tuple[str, str]]:
    """KEY=VALUE pairs of a verl command line or file: shell quoting, `\\` continuations and
    `#` comments as in verl's example scripts; Hydra's `+`/`++` prefixes dropped; the
    launcher (`python3 -m verl.trainer.main_ppo`) skipped."""
    lines = []
    for raw in text.splitlines():
        line = raw.split(" #")[0] if not raw.lstrip().startswith("#") else ""
        lines.append(line.rstrip().removesuffix("\\"))
    pairs, bad = [], []
    for tok in shlex.split(" ".join(lines)):
        if tok in _LAUNCHER or tok.startswith(("python3.", "python2")):
            continue
        key, eq, value = tok.partition("=")
        if not eq or not key:
            bad.append(tok)
            continue
        key = key.lstrip("+")
        if key.startswith("~"):
            bad.append(f"{tok} (deleting a key)")
            continue
        if "$" in value:
            bad.append(f"{tok} (a shell variable: expand it first)")
            continue
        pairs.append((key, value))
    if bad:
        raise VerlError("not KEY=VALUE overrides: " + ", ".join(bad))
    return pairs


def parse_value(v: str) -> Any:
    """Hydra's value syntax, as far as verl's keys use it: True/False/null, numbers, [a,b] lists."""
    s = v.strip()
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none", "~"):
        return None
    if s.startswith("[") and s.endswith("]"):
        inner = s[1:-1].strip()
        return [parse_value(x) for x in inner.split(",")] if inner else []
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


@dataclass
class Translation:
    """Nested overrides for StackConfig, the notes on keys with no setting of their own, and
    the verl keys as given (for the printed config's header)."""

    overrides: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    given: dict[str, Any] = field(default_factory=dict)

    def set(self, dotted: str, value: Any) -> None:
        node = self.overrides
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.overrides
        for p in dotted.split("."):
            if not isinstance(node, dict) or p not in node:
                return default
            node = node[p]
        return node


ARR = "actor_rollout_ref."
ACTOR, ROLLOUT, MODEL = ARR + "actor.", ARR + "rollout.", ARR + "model."

# KL estimators: verl's names -> ours (verl/trainer/ppo/core_algos.py kl_penalty).
_KL = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3", "abs": "abs",
       "kl+": "k1+", "k1+": "k1+", "low_var_kl+": "k3+", "k3+": "k3+", "abs+": "abs+",
       "mse+": "k2", "k2+": "k2"}  # verl: k2's "+" is k2 itself
_ADV = {"grpo": "grpo", "gae": "gae", "rloo": "rloo", "reinforce_plus_plus": "reinforce_plus_plus",
        "reinforce_plus_plus_baseline": "reinforce_plus_plus_baseline"}
_DTYPE = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
_AGG = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    raise ValueError(f"expected True or False, got {v!r}")


def _pos_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"expected a positive integer, got {v!r}")
    return v


def _num(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"expected a number, got {v!r}")
    return float(v)


def _choice(options: dict[str, str] | tuple[str, ...], what: str) -> Callable[[Any], str]:
    def conv(v: Any) -> str:
        if v not in options:
            raise ValueError(f"{what} {v!r} is not supported here (supported: {', '.join(options)})")
        return options[v] if isinstance(options, dict) else v
    return conv


def _note(text: str) -> Callable[[Translation, Any], None]:
    def rule(t: Translation, v: Any) -> None:
        t.notes.append(text)
    return rule


def _only(expected: Any, text: str, why: str) -> Callable[[Translation, Any], None]:
    """Accept the one value that means what loraloop does anyway (with a note); refuse others."""
    def rule(t: Translation, v: Any) -> None:
        if v != expected:
            raise ValueError(why)
        t.notes.append(text)
    return rule


def _to(dotted: str, conv: Callable[[Any], Any] = lambda v: v) -> Callable[[Translation, Any], None]:
    def rule(t: Translation, v: Any) -> None:
        t.set(dotted, conv(v))
    return rule


def _target_modules(v: Any) -> str | list[str]:
    if v == "all-linear":
        return v
    if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
        return v
    raise ValueError(f"expected all-linear or a list like [q_proj,v_proj], got {v!r}")


def _lora_rank(t: Translation, v: Any) -> None:
    r = _pos_int(v)
    t.set("learner.model.lora_rank", r)
    t.set("rollout.engine.max_lora_rank", r)  # the replicas must accept the adapter's rank


def _clip(t: Translation, v: Any) -> None:
    c = _num(v)
    t.set("learner.algo.clip_low", c)
    t.set("learner.algo.clip_high", c)


def _offload(t: Translation, v: Any) -> None:
    if _bool(v):
        t.set("learner.model.cpu_offload", True)
        t.notes.append("actor.fsdp_config.param_offload / optimizer_offload: learner.model.cpu_offload offloads both "
                       "the LoRA parameters and their optimizer state (FSDP2 CPUOffloadPolicy)")


def _kl_type(v: Any) -> str:
    return _choice(_KL, "KL type")(v)


def _reward_path(t: Translation, v: Any) -> None:
    if v is None:
        return
    t.given["custom_reward_function.path"] = v


def _train_files(t: Translation, v: Any) -> None:
    files = v if isinstance(v, list) else [v]
    if len(files) != 1 or not isinstance(files[0], str):
        raise ValueError(f"one training file is supported here, got {v!r}")
    t.set("learner.data.dataset", files[0])
    if t.get("learner.data.reward_fn") is None:  # verl scores by data_source unless told otherwise
        t.set("learner.data.reward_fn", "by_data_source")


def _val_files(t: Translation, v: Any) -> None:
    files = v if isinstance(v, list) else [v]
    if len(files) != 1 or not isinstance(files[0], str):
        raise ValueError(f"one validation file is supported here, got {v!r}")
    t.set("learner.validation.dataset", files[0])


def _keep(name: str, conv: Callable[[Any], Any]) -> Callable[[Translation, Any], None]:
    """Keep the value for `_combine`: keys that only mean something together."""
    def rule(t: Translation, v: Any) -> None:
        t.given[name] = conv(v)
    return rule


def _unsupported(why: str) -> Callable[[Translation, Any], None]:
    def rule(t: Translation, v: Any) -> None:
        raise ValueError(why)
    return rule


NOTE_REF = ("the reference policy is the base model with the adapter disabled: there is no second model "
            "to place or offload")
RULES: dict[str, Callable[[Translation, Any], None]] = {
    # data
    "data.train_batch_size": _to("learner.data.groups_per_step", _pos_int),
    "data.train_files": _train_files,
    "data.max_response_length": _to("learner.data.max_tokens", _pos_int),
    "data.max_prompt_length": _keep("data.max_prompt_length", _pos_int),
    "data.shuffle": _note("data.shuffle: prompts are always shuffled, by learner.data.seed"),
    "data.seed": _to("learner.data.seed", int),
    "data.val_files": _val_files,
    "data.val_batch_size": _note("data.val_batch_size: validation prompts go out in leases like training ones"),
    "data.filter_overlong_prompts": _note("data.filter_overlong_prompts: a prompt longer than the engine's "
                                          "max_model_len is refused by the rollout server"),
    "data.truncation": _only("error", "data.truncation=error: over-long prompts are refused, as here",
                             "prompt truncation other than 'error' is not supported"),
    "data.prompt_key": _only("prompt", "data.prompt_key=prompt: the verl row layout is read as is",
                             "only verl's default prompt_key 'prompt' is supported"),
    "data.reward_fn_key": _only("data_source", "data.reward_fn_key=data_source: as verl's default",
                                "only reward_fn_key 'data_source' is supported"),
    "data.return_raw_chat": _note("data.return_raw_chat: the chat template is applied by the learner when it "
                                  "reads the prompts"),
    # model
    MODEL + "path": _to("model", str),
    MODEL + "use_shm": _to("model_shm", _bool),
    MODEL + "lora_rank": _lora_rank,
    MODEL + "lora_alpha": _to("learner.model.lora_alpha", _num),
    MODEL + "target_modules": _to("learner.model.target_modules", _target_modules),
    MODEL + "exclude_modules": _to("learner.model.exclude_modules", lambda v: v if isinstance(v, list) else [v]),
    MODEL + "enable_gradient_checkpointing": _to("learner.model.gradient_checkpointing", _bool),
    MODEL + "use_remove_padding": _note("model.use_remove_padding: the learner pads each micro-batch to its "
                                        "longest row; results are the same"),
    MODEL + "trust_remote_code": _only(False, "model.trust_remote_code=False: as always here",
                                       "trust_remote_code is never enabled here (no code from a model dir runs)"),
    # actor
    ACTOR + "optim.lr": _to("learner.algo.lr", _num),
    ACTOR + "optim.weight_decay": _to("learner.algo.weight_decay", _num),
    ACTOR + "optim.lr_warmup_steps": lambda t, v: t.set("learner.algo.warmup_steps", max(0, int(v))),
    ACTOR + "optim.lr_warmup_steps_ratio": _keep("lr_warmup_steps_ratio", _num),
    ACTOR + "grad_clip": _to("learner.algo.grad_clip", _num),
    ACTOR + "fsdp_config.fsdp_size": _keep("fsdp_size", int),
    ACTOR + "fsdp_config.param_offload": _offload,
    ACTOR + "fsdp_config.optimizer_offload": _offload,
    ACTOR + "fsdp_config.model_dtype": _to("learner.model.dtype", _choice(_DTYPE, "fsdp_config.model_dtype")),
    ACTOR + "fsdp_config.mixed_precision.param_dtype": lambda t, v: t.set(
        "learner.model.mixed_precision", _choice(_DTYPE, "mixed_precision.param_dtype")(v) == "bfloat16"),
    ACTOR + "ulysses_sequence_parallel_size": _only(1, "actor.ulysses_sequence_parallel_size=1: no sequence "
                                                    "parallelism, as here", "sequence parallelism is not supported"),
    ACTOR + "use_dynamic_bsz": _only(False, "actor.use_dynamic_bsz=False: fixed micro-batches, as here",
                                     "dynamic batch sizes (use_dynamic_bsz=True) are not supported"),
    ACTOR + "use_kl_loss": _keep("use_kl_loss", _bool),
    ACTOR + "kl_loss_coef": _keep("kl_loss_coef", _num),
    ACTOR + "kl_loss_type": _to("learner.algo.kl_type", _kl_type),
    ACTOR + "clip_ratio": _clip,
    ACTOR + "clip_ratio_low": _to("learner.algo.clip_low", _num),
    ACTOR + "clip_ratio_high": _to("learner.algo.clip_high", _num),
    ACTOR + "clip_ratio_c": _to("learner.algo.dual_clip_c", _num),
    ACTOR + "loss_agg_mode": _to("learner.algo.loss_agg", _choice(_AGG, "loss_agg_mode")),
    ACTOR + "entropy_coeff": _to("learner.algo.entropy_coef", _num),
    ACTOR + "ppo_mini_batch_size": _keep("ppo_mini_batch_size", _pos_int),
    ACTOR + "ppo_micro_batch_size_per_gpu": _to("learner.algo.micro_batch_size", _pos_int),
    ACTOR + "ppo_micro_batch_size": _unsupported("give actor.ppo_micro_batch_size_per_gpu (verl deprecated "
                                                 "the global micro-batch size)"),
    ACTOR + "ppo_epochs": _to("learner.algo.ppo_epochs", _pos_int),
    # rollout
    ROLLOUT + "name": _only("vllm", "rollout.name=vllm: rollout servers run vLLM",
                            "rollout servers run vLLM only (rollout.name=vllm)"),
    ROLLOUT + "mode": _note("rollout.mode: rollout servers are their own processes, generating asynchronously"),
    ROLLOUT + "n": _to("learner.data.samples_per_group", _pos_int),
    ROLLOUT + "temperature": _to("learner.data.temperature", _num),
    ROLLOUT + "top_p": _to("learner.data.top_p", _num),
    ROLLOUT + "val_kwargs.do_sample": _keep("val_kwargs.do_sample", _bool),
    ROLLOUT + "val_kwargs.n": _keep("val_kwargs.n", _pos_int),
    ROLLOUT + "val_kwargs.temperature": _keep("val_kwargs.temperature", _num),
    ROLLOUT + "val_kwargs.top_p": _to("learner.validation.top_p", _num),
    ROLLOUT + "val_kwargs.top_k": _only(-1, "rollout.val_kwargs.top_k=-1: no top-k, as here",
                                       "validation top_k is not supported (only -1)"),
    ROLLOUT + "tensor_model_parallel_size": _to("rollout.engine.tensor_parallel_size", _pos_int),
    ROLLOUT + "gpu_memory_utilization": _to("rollout.engine.gpu_memory_utilization", _num),
    ROLLOUT + "max_num_seqs": _to("rollout.engine.max_num_seqs", _pos_int),
    ROLLOUT + "max_model_len": _to("rollout.engine.max_model_len", _pos_int),
    ROLLOUT + "max_num_batched_tokens": _to("rollout.engine.max_num_batched_tokens", _pos_int),
    ROLLOUT + "dtype": _to("rollout.engine.dtype", _choice({**_DTYPE, "float16": "float16", "fp16": "float16"},
                                                           "rollout dtype")),
    ROLLOUT + "enable_prefix_caching": _to("rollout.engine.enable_prefix_caching", _bool),
    ROLLOUT + "load_format": _only("safetensors", "rollout.load_format=safetensors: weights are always "
                                   "safetensors here", "weights load from safetensors only"),
    ROLLOUT + "layered_summon": _note("rollout.layered_summon: publishing gathers the LoRA tensors only, never "
                                      "the base weights, so there is nothing to summon layer by layer"),
    ROLLOUT + "enforce_eager": _note("rollout.enforce_eager: set by the rollout server itself"),
    ROLLOUT + "free_cache_engine": _note("rollout.free_cache_engine: rollout servers keep their KV cache; they "
                                         "do not share the GPU with the learner"),
    ROLLOUT + "log_prob_micro_batch_size_per_gpu": _note("rollout.log_prob_micro_batch_size_per_gpu: behaviour "
                                                         "log-probs come from vLLM with each sample"),
    ARR + "ref.fsdp_config.param_offload": _note("ref.fsdp_config.param_offload: " + NOTE_REF),
    ARR + "ref.log_prob_micro_batch_size_per_gpu": _note("ref.log_prob_micro_batch_size_per_gpu: reference "
                                                         "log-probs use the learner's micro-batches"),
    ARR + "hybrid_engine": _only(True, "hybrid_engine=True: actor and rollout are separate services here",
                                 "only hybrid_engine=True command lines are translated"),
    # algorithm
    "algorithm.adv_estimator": _to("learner.algo.advantage", _choice(_ADV, "adv_estimator")),
    "algorithm.norm_adv_by_std_in_grpo": _keep("norm_adv_by_std_in_grpo", _bool),
    "algorithm.use_kl_in_reward": _keep("use_kl_in_reward", _bool),
    "algorithm.kl_penalty": _to("learner.algo.kl_type", _kl_type),
    "algorithm.kl_ctrl.kl_coef": _keep("kl_ctrl.kl_coef", _num),
    "algorithm.kl_ctrl.type": _to("learner.algo.kl_ctrl", _choice(("fixed", "adaptive"), "kl_ctrl.type")),
    "algorithm.kl_ctrl.target_kl": _to("learner.algo.kl_target", _num),
    "algorithm.kl_ctrl.horizon": _to("learner.algo.kl_horizon", _pos_int),
    "algorithm.gamma": _to("learner.algo.gamma", _num),
    "algorithm.lam": _to("learner.algo.lam", _num),
    "critic.optim.lr": _to("learner.algo.critic_lr", _num),
    # reward
    "custom_reward_function.path": _reward_path,
    "custom_reward_function.name": _keep("custom_reward_function.name", str),
    "reward_model.enable": _only(False, "reward_model.enable=False: rewards are functions, as here",
                                 "reward models are not supported (use custom_reward_function)"),
    # trainer
    "trainer.total_training_steps": _to("learner.steps", _pos_int),
    "trainer.total_epochs": _keep("total_epochs", _pos_int),
    "trainer.save_freq": _keep("save_freq", int),
    "trainer.test_freq": _keep("test_freq", int),
    "trainer.val_before_train": _to("learner.validation.before_train", _bool),
    "trainer.n_gpus_per_node": _keep("n_gpus_per_node", _pos_int),
    "trainer.nnodes": _keep("nnodes", _pos_int),
    "trainer.experiment_name": lambda t, v: t.set("run_dir", f"runs/{v}"),
    "trainer.project_name": _note("trainer.project_name: runs are told apart by their run dir"),
    "trainer.logger": _note("trainer.logger: metrics go to <run_dir>/metrics.jsonl and TensorBoard events"),
    "trainer.critic_warmup": _only(0, "trainer.critic_warmup=0: as here", "critic warm-up is not supported"),
    "trainer.device": _note("trainer.device: the learner uses CUDA where present, else the CPU"),
}


def translate(pairs: list[tuple[str, str]]) -> Translation:
    """Translate verl overrides; VerlError lists every key that cannot be."""
    t = Translation()
    errors = []
    for key, raw in pairs:
        rule = RULES.get(key)
        if rule is None:
            errors.append(f"{key}: unknown verl key (not translated)")
            continue
        value = parse_value(raw)
        try:
            rule(t, value)
        except (ValueError, TypeError) as e:
            errors.append(f"{key}={raw}: {e}")
    if not errors:
        try:
            _combine(t)
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise VerlError("cannot translate this verl command line:\n  " + "\n  ".join(errors))
    _generic_defaults(t)
    return t


def _generic_defaults(t: Translation) -> None:
    """A verl command line runs on loraloop's generic defaults where it says nothing, not on the
    tiny demo's (`up` with no config): the demo's micro-batch of 256 rows, 15 s lease deadline,
    KL metric every 10th step and checkpoint every 100 steps are sized for a 0.3 M model on 2
    CPU cores. The Ray launcher starts from the same generic defaults."""
    from services.learner.config import LearnerConfig
    from services.rollout.config import RolloutConfig
    from services.stack_config import DEMO_LEARNER, DEMO_ROLLOUT

    for section, demo, generic in (("learner", DEMO_LEARNER, LearnerConfig()), ("rollout", DEMO_ROLLOUT,
                                                                               RolloutConfig())):
        plain = generic.model_dump()
        for dotted in _leaves(demo.model_dump(exclude_unset=True)):
            if t.get(f"{section}.{dotted}") is None:
                node: Any = plain
                for part in dotted.split("."):
                    node = node[part]
                t.set(f"{section}.{dotted}", node)


def _leaves(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def _combine(t: Translation) -> None:
    """The keys that only mean something together (verl's own rules for them)."""
    g = t.given
    # KL: in the loss with actor.use_kl_loss (coefficient kl_loss_coef, verl's default 0.001), or
    # in the reward with algorithm.use_kl_in_reward (kl_ctrl.kl_coef, same default); off otherwise.
    in_loss, in_reward = g.get("use_kl_loss", False), g.get("use_kl_in_reward", False)
    if in_loss and in_reward:
        raise ValueError("actor.use_kl_loss and algorithm.use_kl_in_reward are both on: choose one")
    t.set("learner.algo.kl_in_reward", in_reward)
    t.set("learner.algo.kl_coef", g.get("kl_loss_coef", 0.001) if in_loss
          else g.get("kl_ctrl.kl_coef", 0.001) if in_reward else 0.0)
    # verl clips negative advantages at clip_ratio_c (default 3) always.
    if t.get("learner.algo.dual_clip_c") is None:
        t.set("learner.algo.dual_clip_c", 3.0)
    if g.get("norm_adv_by_std_in_grpo") is False:
        if t.get("learner.algo.advantage", "grpo") != "grpo":
            raise ValueError("algorithm.norm_adv_by_std_in_grpo=False applies to adv_estimator=grpo only")
        t.set("learner.algo.advantage", "dr_grpo")
    # ppo_mini_batch_size counts prompts, as train_batch_size does: optimizer steps per batch.
    if "ppo_mini_batch_size" in g:
        batch = t.get("learner.data.groups_per_step")
        if batch is None:
            raise ValueError("actor.ppo_mini_batch_size needs data.train_batch_size")
        if batch % g["ppo_mini_batch_size"]:
            raise ValueError(f"data.train_batch_size={batch} is not a multiple of "
                             f"actor.ppo_mini_batch_size={g['ppo_mini_batch_size']}")
        t.set("learner.algo.mini_batches", batch // g["ppo_mini_batch_size"])
    # Learner ranks: fsdp_size, or every GPU of the run (-1 and unset mean all, as in verl).
    known = "n_gpus_per_node" in g or "nnodes" in g
    gpus = g.get("n_gpus_per_node", 1) * g.get("nnodes", 1)
    fsdp = g.get("fsdp_size", -1)
    nproc = gpus if fsdp in (-1, None) else fsdp
    if nproc < 1 or (known and nproc > gpus):
        raise ValueError(f"actor.fsdp_config.fsdp_size={fsdp} must be -1 or 1..{gpus} (n_gpus_per_node x nnodes)")
    if known or "fsdp_size" in g:
        t.set("learner.nproc", nproc)
        t.notes.append(f"learner: {nproc} FSDP2 rank(s); rollout replicas are separate processes "
                       "(rollout_replicas, each with rollout.engine.tensor_parallel_size GPUs)")
    # verl's dtypes: the rollout engine in bf16 (rollout.dtype), the actor's weights in fp32 with bf16
    # compute (fsdp_config.model_dtype, mixed_precision.param_dtype). Both only where no key said.
    if t.get("rollout.engine.dtype") is None:
        t.set("rollout.engine.dtype", "bfloat16")
        t.notes.append("rollout.dtype: bfloat16, verl's default")
    if t.get("learner.model.mixed_precision") is None and t.get("learner.model.dtype") in (None, "float32"):
        t.set("learner.model.mixed_precision", True)
        t.notes.append("actor: float32 weights with bfloat16 compute (FSDP2 mixed precision), verl's default")
    # The engine must hold the longest prompt + response.
    if "data.max_prompt_length" in g and t.get("rollout.engine.max_model_len") is None:
        t.set("rollout.engine.max_model_len", g["data.max_prompt_length"] + t.get("learner.data.max_tokens", 0))
    if "custom_reward_function.path" in g:
        path = Path(g["custom_reward_function.path"])
        name = g.get("custom_reward_function.name", "compute_score")
        if path.suffix != ".py" or not path.stem.isidentifier() or not name.isidentifier():
            raise ValueError(f"custom_reward_function.path={path} name={name}: expected a .py file whose name is a "
                             "Python module name, and a function name")
        t.set("learner.data.reward_fn", f"{path.stem}:{name}")
        t.set("python_path", [str(path.resolve().parent)])
        t.notes.append(f"custom_reward_function: module {path.stem} from {path.resolve().parent} (put on the "
                       "stack's PYTHONPATH; a replica started elsewhere needs it importable too)")
    # Validation (verl's trainer loop): a round before training (val_before_train, default on),
    # every test_freq steps and at the last step when test_freq > 0; greedy unless val_kwargs.do_sample,
    # then val_kwargs.n samples at val_kwargs.temperature (verl's defaults: 1 sample, temperature 0).
    if "test_freq" in g:
        t.set("learner.validation.every", max(0, g["test_freq"]))
        t.set("learner.validation.at_end", g["test_freq"] > 0)
    if t.get("learner.validation.dataset") is None and ("test_freq" in g or "val_kwargs.do_sample" in g):
        t.notes.append("trainer.test_freq / val_kwargs: no data.val_files, so no validation pass")
    if "val_kwargs.do_sample" in g:
        sample = g["val_kwargs.do_sample"]
        t.set("learner.validation.greedy", not sample)
        t.set("learner.validation.samples", g.get("val_kwargs.n", 1) if sample else 0)
        if sample:
            temp = g.get("val_kwargs.temperature", 0.0)
            if temp <= 0:
                raise ValueError("rollout.val_kwargs.do_sample=True needs val_kwargs.temperature > 0")
            t.set("learner.validation.temperature", temp)
    elif "val_kwargs.n" in g or "val_kwargs.temperature" in g:
        t.notes.append("rollout.val_kwargs.n / temperature apply with val_kwargs.do_sample=True (verl's rule); "
                       "without it validation is greedy plus loraloop's default sampled pass")
    if "save_freq" in g:
        t.set("learner.checkpoint.every", g["save_freq"] if g["save_freq"] > 0 else 10**9)
        if g["save_freq"] <= 0:
            t.notes.append("trainer.save_freq<=0: no periodic checkpoints (the last step's is written at the end)")
    if "total_epochs" in g and t.get("learner.steps") is None:
        t.set("learner.steps", g["total_epochs"] * _steps_per_epoch(t))
    if "lr_warmup_steps_ratio" in g and t.get("learner.algo.warmup_steps") is None:
        steps = t.get("learner.steps")
        if steps is None:
            raise ValueError("optim.lr_warmup_steps_ratio needs trainer.total_training_steps or total_epochs")
        t.set("learner.algo.warmup_steps", int(g["lr_warmup_steps_ratio"] * steps))


def _steps_per_epoch(t: Translation) -> int:
    dataset = t.get("learner.data.dataset")
    batch = t.get("learner.data.groups_per_step")
    if dataset is None or batch is None:
        raise ValueError("trainer.total_epochs needs data.train_files and data.train_batch_size "
                         "(or give trainer.total_training_steps)")
    path = Path(dataset)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as e:
            raise ValueError(f"trainer.total_epochs: cannot count the rows of {dataset}: {e}") from None
    elif path.suffix == ".jsonl" and path.exists():
        rows = sum(1 for line in path.open() if line.strip())
    else:
        raise ValueError(f"trainer.total_epochs: cannot count the rows of {dataset} (give trainer.total_training_steps)")
    return max(1, math.floor(rows / batch))  # verl drops the last partial batch


def read_file(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise SystemExit(f"loraloop up --verl-file {path}: {e.strerror}") from None
