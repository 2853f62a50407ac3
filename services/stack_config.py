"""`loraloop up` settings: the whole local stack in one file.

Each service keeps its own config section ([learner], [rollout], [broker]); `up` fills in
what ties them together (addresses, ports, tokens, the model path) and writes one TOML per
service into the run dir, so a replica started by hand can use the same file.
"""

from __future__ import annotations

from pydantic import Field

from services.broker.config import BrokerConfig
from services.common.config import Section
from services.learner.config import (
    AlgoConfig,
    CheckpointConfig,
    DataConfig,
    LearnerConfig,
    ModelConfig,
)
from services.rollout.config import RolloutConfig

# The tiny arithmetic demo (shared/measurements.md): GRPO, 32 prompts x 8 samples, T=1,
# LoRA r=16 alpha=32 on all linear layers, AdamW lr 1e-3, token-mean, no KL.
DEMO_LEARNER = LearnerConfig(
    steps=700, threads=1,
    model=ModelConfig(lora_rank=16, lora_alpha=32.0, target_modules="all-linear"),
    algo=AlgoConfig(advantage="grpo", lr=1e-3, loss_agg="token-mean", kl_coef=0.0, max_staleness=1),
    data=DataConfig(dataset="arithmetic", groups_per_step=32, samples_per_group=8, max_tokens=3,
                    temperature=1.0, reward_fn="arithmetic", lease_deadline_s=15.0),
    checkpoint=CheckpointConfig(every=100, keep_last=2),
)


class StackConfig(Section):
    run_dir: str = "runs/arithmetic"
    """Logs, Redis data, checkpoints, metrics.jsonl and curves.png go here."""
    model: str = ""
    """Base model directory; "" builds the tiny model under <run_dir>/model on first run."""
    warm_start: bool = True
    """Warm-start the built tiny model on the arithmetic task so RL has signal (never a user's model)."""
    warm_start_target: float = Field(0.15, gt=0, lt=1)
    """Sampled exact match at which the warm start stops."""
    seed: int = 0
    """Seed for the built model, the warm start and the learner."""
    rollout_replicas: int = Field(1, ge=0)
    """Rollout servers to start (more can join by hand: see <run_dir>/rollout.toml)."""
    rollout_cpu_bind: str = "0"
    """CPU cores for each local rollout engine (vLLM's VLLM_CPU_OMP_THREADS_BIND); the learner
    gets its `threads`. On 2 cores: engine on core 0, learner 1 thread."""
    plot: bool = True
    """Write <run_dir>/curves.png at the end."""
    learner: LearnerConfig = DEMO_LEARNER
    """The learner (its model.path, broker and port are filled in by `up`)."""
    rollout: RolloutConfig = RolloutConfig()
    """Rollout replicas (model, broker, learner and port filled in by `up`)."""
    broker: BrokerConfig = BrokerConfig()
    """The broker (port and Redis filled in by `up`)."""


ALIASES = {"run-dir": "run_dir", "rollout-replicas": "rollout_replicas", "steps": "learner.steps"}
