"""`loraloop learner` settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from services.common.config import AuthConfig, ClientTLSConfig, Section, ServerConfig, TLSConfig

# The names registered in services.learner.algorithms (ADVANTAGE_ESTIMATORS, AGG_MODES,
# KL_ESTIMATORS), spelled out here so that loading a config needs no torch;
# tests/unit/test_algo_config.py fails when a registry and its Literal disagree.
AdvantageName = Literal[
    "grpo", "dr_grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "gae"
]
LossAggName = Literal[
    "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"
]
KlName = Literal["k1", "k2", "k3", "abs", "k1+", "k3+", "abs+"]


class ModelConfig(Section):
    path: str = "runs/tiny-model"
    """Local base model directory (HF layout, safetensors)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the base weights in memory (LoRA weights stay float32)."""
    lora_rank: int = Field(16, ge=1)
    """LoRA rank r."""
    lora_alpha: float = Field(32.0, gt=0)
    """LoRA alpha (scale = alpha / r)."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Modules that get LoRA: a list of names (q_proj, v_proj, ...) or all-linear."""
    exclude_modules: list[str] = []
    """Module names never given LoRA."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input."""
    init_adapter: str = ""
    """Continue from this PEFT adapter directory instead of a fresh adapter."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    cpu_offload: bool = False
    """FSDP2 parameter/optimizer offload to CPU (GPU runs)."""
    mixed_precision: bool = False
    """bf16 compute with fp32 reduction under FSDP2 (GPU runs with bf16)."""


class AlgoConfig(Section):
    advantage: AdvantageName = "grpo"
    """Advantage estimator: grpo, dr_grpo, rloo, reinforce_plus_plus, reinforce_plus_plus_baseline,
    or gae (PPO with a critic: a second LoRA adapter plus a value head on the same base)."""
    loss_agg: LossAggName = "token-mean"
    """Loss aggregation: token-mean, token-sum, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm."""
    clip_low: float = Field(0.2, ge=0)
    """PPO ratio clip below 1 (1 - clip_low)."""
    clip_high: float = Field(0.2, ge=0)
    """PPO ratio clip above 1 (1 + clip_high); 0.28 is DAPO's clip-higher."""
    dual_clip_c: float | None = None
    """Dual-clip constant (e.g. 3.0) for negative advantages; none to disable."""
    tis_cap: float | None = 2.0
    """Truncated importance weight cap against the rollout's behaviour log-probs; none to disable."""
    kl_coef: float = Field(0.0, ge=0)
    """KL-to-reference coefficient (reference = base with the adapter disabled)."""
    log_kl: bool = True
    """Measure KL to the reference (actor/kl) even when kl_coef is 0 (one extra forward)."""
    log_kl_every: int = Field(1, ge=1)
    """With kl_coef 0, measure that KL on every N-th step only (the first step after a start or
    resume, then every N): the forward it costs is a quarter of the demo's update."""
    kl_type: KlName = "k3"
    """KL estimator: k1, k2, k3 (verl's low_var_kl), abs, or k1+ / k3+ / abs+ (that value with
    k2's gradient, verl's straight-through variants)."""
    kl_in_reward: bool = False
    """Put the KL penalty in the reward instead of the loss."""
    kl_ctrl: Literal["fixed", "adaptive"] = "fixed"
    """The in-reward KL coefficient: fixed at kl_coef, or adaptive (Ziegler et al. 2019, verl's
    AdaptiveKLController): after each step coef *= 1 + clip(kl / kl_target - 1, -0.2, 0.2) *
    batch_sequences / kl_horizon, from kl_coef, where kl is the batch's mean per-sequence KL."""
    kl_target: float | None = Field(None, gt=0)
    """The KL the adaptive controller steers to (kl_ctrl = adaptive)."""
    kl_horizon: int = Field(10000, ge=1)
    """The adaptive controller's horizon, in sequences."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus coefficient."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount (REINFORCE++, GAE)."""
    lam: float = Field(1.0, ge=0, le=1)
    """GAE lambda."""
    critic_lr: float | None = Field(None, gt=0)
    """Critic (value adapter + head) learning rate with advantage = gae; none = lr."""
    value_clip: float | None = Field(0.2, gt=0)
    """PPO value clip around the pre-update values (gae); none for the plain squared error."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each batch."""
    mini_batches: int = Field(1, ge=1)
    """Optimizer steps per epoch (the batch is split into this many mini-batches)."""
    micro_batch_size: int = Field(64, ge=1)
    """Sequences per forward/backward on one rank (gradient accumulation beyond)."""
    lr: float = Field(1e-3, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(0, ge=0)
    """Linear LR warmup (optimizer steps)."""
    grad_clip: float = Field(1.0, gt=0)
    """Gradient-norm clip."""
    max_staleness: int = Field(1, ge=0)
    """Largest current_version - behaviour_version accepted; 0 is the synchronous algorithm."""

    @model_validator(mode="after")
    def _adaptive_kl(self) -> AlgoConfig:
        if self.kl_ctrl == "adaptive" and not (self.kl_in_reward and self.kl_target and self.kl_coef > 0):
            raise ValueError("kl_ctrl = adaptive needs kl_in_reward = true, kl_coef > 0 (its start) and kl_target")
        return self

    @property
    def needs_critic(self) -> bool:
        """The advantage estimator reads a critic's values (gae): PPO with a critic, a second
        LoRA adapter plus a value head. The estimator's registration says so (imported here,
        on use, so that loading a config stays torch-free)."""
        from services.learner.algorithms import advantage_needs_values

        return advantage_needs_values(self.advantage)


class DataConfig(Section):
    dataset: str = "arithmetic"
    """Built-in task name (arithmetic), or a .parquet (verl layout) / .jsonl file."""
    seed: int = 0
    """Shuffling seed."""
    groups_per_step: int = Field(32, ge=1)
    """Prompt groups per training step."""
    samples_per_group: int = Field(8, ge=1)
    """Samples generated per prompt (n)."""
    max_tokens: int = Field(3, ge=1)
    """Response length limit."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (the learner divides its logits by it too)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling."""
    ignore_eos: bool = False
    """Generate every response to max_tokens, past end-of-sequence (vLLM's ignore_eos): for
    benchmarks with fixed-length responses."""
    reward_fn: str = "arithmetic"
    """Reward function: built-in name (arithmetic, arithmetic_prefix, gsm8k, math) or module:function."""
    lease_deadline_s: float = Field(60.0, gt=0)
    """A leased group not returned by then is leased again."""


class ValidationConfig(Section):
    dataset: str = ""
    """Validation prompts (verl's data.val_files): a built-in task name or a .parquet / .jsonl
    file; "" = no validation pass."""
    every: int = Field(0, ge=0)
    """A round every this many steps (verl's trainer.test_freq); 0 = only before training and
    at the end."""
    before_train: bool = True
    """A round of the starting adapter before the first step (verl's val_before_train)."""
    at_end: bool = True
    """A round of the final adapter; the learner waits for it (up to `wait_end_s`) before it ends."""
    wait_end_s: float = Field(300.0, gt=0)
    """How long the end of training waits for the last round."""
    greedy: bool = True
    """Score one greedy answer per prompt (temperature 0): `val/greedy/*`."""
    samples: int = Field(4, ge=0)
    """Sampled answers per prompt at `temperature` (`val/sampled/*`, with pass@samples); 0 = none."""
    temperature: float = Field(1.0, gt=0)
    """Temperature of the sampled answers."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling for the sampled answers."""
    max_prompts: int = Field(0, ge=0)
    """Use only the first this many prompts of the set (0 = all)."""
    correct_threshold: float = 1.0
    """A sample counts as correct when its reward details say `acc` (verl's convention), else
    when its reward is at least this."""

    @model_validator(mode="after")
    def _some_mode(self) -> ValidationConfig:
        if self.dataset and not self.greedy and self.samples == 0:
            raise ValueError("validation: set greedy=true or samples >= 1 (nothing to score otherwise)")
        return self


class CheckpointConfig(Section):
    every: int = Field(10, ge=1)
    """Checkpoint every this many steps."""
    keep_last: int = Field(3, ge=1)
    """Checkpoints kept."""
    resume: str = "auto"
    """auto (latest checkpoint in the run dir, if any), never, or a checkpoint directory."""


class LearnerConfig(Section):
    run_dir: str = "runs/local"
    """Checkpoints, metrics.jsonl and TensorBoard events go here."""
    adapter_name: str = "policy"
    """Name the adapter is published under."""
    steps: int = Field(100, ge=1)
    """Training steps."""
    nproc: int = Field(1, ge=1)
    """Ranks (processes) under torchrun; FSDP2 shards the model across them."""
    threads: int = Field(1, ge=1)
    """torch threads per rank (share the cores with rollout servers on one machine)."""
    seed: int = 0
    """Global seed."""
    release_freed_memory: bool = True
    """glibc: fixed 4 MB malloc thresholds so freed activations return to the OS (LoRA's peak on
    the 0.5B-shaped bench: 0.46x of full fine-tuning instead of 0.66x); see services/common/memory.py."""
    broker: str = "127.0.0.1:50050"
    """Broker address."""
    token_env: str = "LORALOOP_TOKEN"
    """Environment variable with this learner's own bearer token (role learner)."""
    server: ServerConfig = ServerConfig(port=50053)
    """gRPC listener for leases and trajectories (rank 0)."""
    model: ModelConfig = ModelConfig()
    """Base model and LoRA."""
    algo: AlgoConfig = AlgoConfig()
    """RL algorithm."""
    data: DataConfig = DataConfig()
    """Prompts and sampling."""
    validation: ValidationConfig = ValidationConfig()
    """Validation pass on held-out prompts (val/* metrics)."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Checkpoints."""
    auth: AuthConfig = AuthConfig()
    """Who may lease and submit (role rollout) or administer (role learner)."""
    tls: TLSConfig = TLSConfig()
    """Optional TLS."""
    client_tls: ClientTLSConfig = ClientTLSConfig()
    """TLS to the services this one calls (broker, learner): set `ca_file` to speak TLS to them."""
    log_level: str = "INFO"
    """Python logging level."""


ALIASES = {"port": "server.port", "model-path": "model.path", "resume": "checkpoint.resume"}
