"""`loraloop up` settings: the whole local stack in one file.

Each service keeps its own config section ([learner], [rollout], [broker]); `up` fills in
what ties them together (addresses, ports, tokens, the model path) and writes one TOML per
service into the run dir, so a replica started by hand can use the same file.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, model_validator

from services.broker.config import BrokerConfig
from services.common.config import ClientTLSConfig, Section, TLSConfig, merge
from services.learner.config import (
    AlgoConfig,
    CheckpointConfig,
    DataConfig,
    LearnerConfig,
    ModelConfig,
)
from services.rollout.config import EngineConfig, RolloutConfig

# The tiny arithmetic demo (shared/measurements.md): GRPO, 32 prompts x 8 samples, T=1,
# LoRA r=16 alpha=32 on all linear layers, AdamW lr 1e-3, token-mean, no KL.
DEMO_LEARNER = LearnerConfig(
    steps=700, threads=1,
    model=ModelConfig(lora_rank=16, lora_alpha=32.0, target_modules="all-linear"),
    # One micro-batch: the whole batch is 256 x 8 tokens of a 0.3 M model, and each of 4
    # micro-batches paid the per-op overhead again (update 0.177 -> 0.153 s in the stack).
    algo=AlgoConfig(advantage="grpo", lr=1e-3, loss_agg="token-mean", kl_coef=0.0, max_staleness=1,
                    log_kl_every=10, micro_batch_size=256),
    data=DataConfig(dataset="arithmetic", groups_per_step=32, samples_per_group=8, max_tokens=3,
                    temperature=1.0, reward_fn="arithmetic", lease_deadline_s=15.0),
    # Every 20 steps: a learner killed mid-run redoes at most 20 steps (~5 s here); a checkpoint
    # takes ~40-55 ms on this model, ~2 ms a step (about 1% of the demo's 0.24 s step).
    checkpoint=CheckpointConfig(every=20, keep_last=2),
)


# A whole batch (32 groups x 8 samples) in the engine at once: 4 leases of 8 groups in flight,
# and room for all 256 sequences in one engine step (vLLM's own default max_num_seqs). With
# 64 the batch went through in four waves: the demo's step 0.38 s -> 0.25 s.
DEMO_ROLLOUT = RolloutConfig(leases_in_flight=4, engine=EngineConfig(max_num_seqs=256))


class RestartConfig(Section):
    max_restarts: int = Field(5, ge=0)
    """Restarts of one service (Redis, broker, a learner, a replica) before the run ends with its
    log tail; 0: the first death ends the run."""
    backoff_s: float = Field(1.0, ge=0)
    """Wait before a service's first restart; doubled for each further one ..."""
    backoff_max_s: float = Field(20.0, ge=0)
    """... up to this."""


class StackTLSConfig(Section):
    cert_file: str | None = None
    """Certificate (PEM) every service of the stack serves gRPC and the OpenAI API with; it must
    name 127.0.0.1 (the stack's addresses) among its subject alternative names."""
    key_file: str | None = None
    """Its private key (PEM)."""
    ca_file: str | None = None
    """CA (PEM) that signed it: each service verifies the others with it, and stack.env names it
    (LORALOOP_TLS_CA) for clients."""
    mutual: bool = False
    """Mutual TLS: the servers also require a client certificate signed by `ca_file`; each
    service presents `cert_file` as its own (so it must allow client auth too)."""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file or self.key_file or self.ca_file)

    def server(self) -> TLSConfig:
        return TLSConfig(cert_file=self.cert_file, key_file=self.key_file, ca_file=self.ca_file if self.mutual else None)

    def client(self) -> ClientTLSConfig:
        return ClientTLSConfig(ca_file=self.ca_file, cert_file=self.cert_file if self.mutual else None,
                               key_file=self.key_file if self.mutual else None)

    @model_validator(mode="after")
    def _complete(self) -> StackTLSConfig:
        if self.enabled:
            missing = [k for k in ("cert_file", "key_file", "ca_file") if not getattr(self, k)]
            if missing:
                raise ValueError(f"tls needs cert_file, key_file and ca_file together (missing: {', '.join(missing)})")
            from pathlib import Path

            for k in ("cert_file", "key_file", "ca_file"):
                path = Path(getattr(self, k)).expanduser().resolve()
                if not path.is_file():
                    raise ValueError(f"tls.{k}: no file {path}")
                setattr(self, k, str(path))
        return self


class RunConfig(Section):
    weight: float = Field(1.0, gt=0)
    """This run's share of each replica's leases in flight, relative to the other runs'."""
    learner: dict[str, Any] = {}
    """This run's changes to the top-level [learner]: `adapter_name` (each run its own) and
    whatever else differs (`[runs.learner.model] lora_rank = 8`, `seed`, `steps`, ...)."""


class StackConfig(Section):
    run_dir: str = "runs/arithmetic"
    """Logs, Redis data, checkpoints, metrics.jsonl and curves.png go here."""
    model: str = ""
    """Base model directory; "" builds the tiny model under <run_dir>/model on first run."""
    python_path: list[str] = []
    """Directories put first on PYTHONPATH of every process the stack starts: where a reward
    module named `module:function` in learner.data.reward_fn lives (verl's
    custom_reward_function.path becomes its directory here and its file name the module)."""
    model_shm: bool = False
    """Copy the base model once to /dev/shm (reused while its files are unchanged) and load it
    from there in the learner and the rollout engines (verl's `use_shm`); where it does not
    fit, it loads from `model` and says so."""
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
    rollout: RolloutConfig = DEMO_ROLLOUT
    """Rollout replicas (model, broker, learner and port filled in by `up`)."""
    broker: BrokerConfig = BrokerConfig()
    """The broker (port and Redis filled in by `up`)."""
    tls: StackTLSConfig = StackTLSConfig()
    """TLS between every service of the stack, and on the OpenAI API (off unless files are given)."""
    restart: RestartConfig = RestartConfig()
    """What `up` does when a service dies: Redis comes back from its AOF, the broker as it was, a
    learner from its last checkpoint (new publisher epoch, version numbers go on), a replica
    fresh; with backoff, a bounded number of times each."""
    runs: list[RunConfig] = []
    """Several training runs on one rollout fleet: one learner per [[runs]] entry (the top-level
    [learner] with the entry's changes, its own adapter name, run dir <run_dir>/<adapter_name>),
    every replica leasing from all of them by weight. Empty: one run, the [learner] itself."""

    @model_validator(mode="before")
    @classmethod
    def _demo_defaults(cls, data: Any) -> Any:
        """A [learner] or [rollout] given in part keeps the stack's defaults (the demo's, which
        --help shows) for what it leaves out. Without this, `--learner.steps=30` alone rebuilt
        the learner from LearnerConfig's generic defaults: micro-batch 64 instead of 256, the
        KL metric's forward every step instead of every 10th, a checkpoint every 10 steps."""
        if isinstance(data, dict):
            data = dict(data)
            for key, demo in (("learner", DEMO_LEARNER), ("rollout", DEMO_ROLLOUT)):
                if isinstance(data.get(key), dict):
                    data[key] = merge(demo.model_dump(exclude_unset=True), data[key])
        return data

    @model_validator(mode="after")
    def _check_runs(self) -> StackConfig:
        names = [lc.adapter_name for lc, _ in self.run_learners()]
        if len(set(names)) != len(names):
            raise ValueError(f"each of [[runs]] needs its own learner.adapter_name (got {names})")
        return self

    def run_learners(self) -> list[tuple[LearnerConfig, float]]:
        """(learner config, weight) of each run."""
        if not self.runs:
            return [(self.learner, 1.0)]
        base = self.learner.model_dump()
        out = []
        for k, r in enumerate(self.runs):
            try:
                out.append((LearnerConfig.model_validate(merge(base, r.learner)), r.weight))
            except ValidationError as e:
                where = "; ".join(f"runs[{k}].learner.{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
                raise ValueError(where) from None
        return out


ALIASES = {"run-dir": "run_dir", "rollout-replicas": "rollout_replicas", "steps": "learner.steps"}
