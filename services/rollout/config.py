"""`loraloop rollout` settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from services.common.config import AuthConfig, ClientTLSConfig, Section, ServerConfig, TLSConfig


class EngineConfig(Section):
    model: str = "runs/tiny-model"
    """Local base model directory (HF layout, safetensors). Loaded once."""
    dtype: str = "float32"
    """Weights/activations dtype in the engine (float32, bfloat16, float16)."""
    max_model_len: int = Field(512, ge=16)
    """Longest prompt + response, in tokens."""
    max_num_seqs: int = Field(64, ge=1)
    """Sequences in one batch at most."""
    max_num_batched_tokens: int | None = Field(None, ge=1)
    """Tokens the scheduler batches in one engine step at most (vLLM's max_num_batched_tokens;
    none = vLLM's default for the model length)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one engine shards the model over (vLLM's tensor_parallel_size; GPU builds)."""
    executor: Literal["auto", "uni", "mp"] = "auto"
    """Where vLLM runs the model (its distributed_executor_backend). "uni": inside the engine-core
    process, beside the scheduler; "mp": in worker processes of their own. "auto": "uni" for a
    CPU engine of one rank (vLLM's CPU build would pick "mp": a third process per replica, two
    shared-memory round trips and a busy wait on each side per engine step), else vLLM's choice."""
    max_loras: int = Field(4, ge=1)
    """Different adapters in one batch at most (vLLM max_loras)."""
    max_cpu_loras: int = Field(16, ge=1)
    """Adapters kept loaded in the engine's host cache (LRU beyond; reloaded from the local cache)."""
    max_lora_rank: int = Field(16, ge=1)
    """Largest adapter rank accepted; higher-rank adapters are refused."""
    kv_cache_gib: int = Field(1, ge=1)
    """CPU KV-cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE takes an integer); GPU builds use
    gpu_memory_utilization."""
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    """Fraction of GPU memory for the engine (GPU builds only)."""
    cpu_threads_bind: str = "auto"
    """CPU cores the engine's compute threads run on (VLLM_CPU_OMP_THREADS_BIND: "auto", "0", "0-1",
    "nobind"). Share the cores out when other compute-heavy processes run on the machine."""
    idle_spin_ms: float = Field(50.0, ge=0)
    """How long vLLM's engine processes busy-wait for more work before they sleep (CPU build; vLLM's
    own is 1000 ms, a core lost for a second after every burst). Keep it above the gaps between
    decode steps: 2 ms slowed the tiny model's generation ~10x."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of shared prefixes (keyed per adapter version, never shared across versions)."""
    seed: int = 0
    """Engine seed (per-request seeds override it)."""
    scheduling_policy: Literal["priority", "fcfs"] = "priority"
    """vLLM's scheduling policy: "priority" orders waiting requests by `priority` (see the
    rollout's [priority]), then arrival; "fcfs" by arrival alone (priorities are ignored)."""


class AdapterCacheConfig(Section):
    dir: str = ""
    """Where fetched adapters are written for the engine to load ("" = /dev/shm when present, else a temp dir)."""
    follow: list[str] = []
    """Adapter names to hot-load as the broker announces new versions (others load on first request)."""
    load_staged: bool = True
    """For followed names, fetch and load a new version's bytes while the broker is still
    uploading and committing them (its STAGED event), and serve it once the commit is durable:
    the upload, the durable write and the load overlap instead of running one after another.
    A version is never served before its commit; a staged load whose upload fails is dropped."""


class HttpConfig(Section):
    enabled: bool = True
    """Serve the OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions) and
    /metrics, /health over HTTP beside gRPC. TLS and tokens are the gRPC server's (`tls`, `auth`)."""
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 for all)."""
    port: int = Field(8000, ge=0, le=65535)
    """Port to listen on (0: pick a free one and print it)."""
    served_model_name: str = ""
    """The base model's id in `model` and /v1/models ("" = the model path, as `vllm serve` does)."""
    max_concurrent: int = Field(512, ge=1)
    """Requests in flight at most; more are answered 429 with retry-after (backpressure)."""
    grace_s: float = Field(5.0, ge=0)
    """On stop, how long open requests get to finish."""


class LearnerTarget(Section):
    address: str
    """A learner's address (host:port) to lease prompt groups from."""
    weight: float = Field(1.0, gt=0)
    """This learner's share of the replica's leases in flight, relative to the others'."""


class PriorityConfig(Section):
    training: int = 0
    """vLLM priority of the training worker's requests (lower runs first; ties by arrival)."""
    users: int = 0
    """Priority of inference requests (HTTP and gRPC). A user may ask for a later one (vLLM's
    `priority` field or X-Vllm-Priority header), never for an earlier one. E.g. users = -1
    serves users before training; training = -1 the reverse; equal values share by arrival."""


class RolloutConfig(Section):
    server: ServerConfig = ServerConfig(port=50052)
    """gRPC listener for Generate / ListAdapters."""
    engine: EngineConfig = EngineConfig()
    """The vLLM engine."""
    adapters: AdapterCacheConfig = AdapterCacheConfig()
    """Adapter hot-loading."""
    broker: str = "127.0.0.1:50050"
    """Broker address (host:port)."""
    learner: str = ""
    """Learner address for the training loop ("" = serve inference only, unless `learners`)."""
    learners: list[LearnerTarget] = []
    """Several training runs on this replica: learners to lease from, each with its weight, e.g.
    `--learners='[{address="h:50051", weight=3}, {address="h:50061"}]'` (`learner` counts as one
    more, weight 1). Each run's groups go back to its own learner only."""
    token_env: str = "LORALOOP_TOKEN"
    """Environment variable with this server's own bearer token (role rollout) for broker and learner."""
    worker_id: str = ""
    """Name of this replica in leases and logs ("" = hostname-pid)."""
    leases_in_flight: int = Field(2, ge=1)
    """Leases generated concurrently by the training loop, over all learners: while several want
    more, each gets a share in proportion to its weight; one alone may use them all."""
    lease_wait_ms: int = Field(1000, ge=0, le=5000)
    """With no work at the learner, how long it may hold a lease request before saying so (a
    long poll): the next batch starts the moment the learner frees it, instead of after a
    retry sleep. 0 = ask, and sleep the learner's retry_after_ms when refused."""
    priority: PriorityConfig = PriorityConfig()
    """Training vs users in the engine's queue (engine.scheduling_policy = "priority")."""
    generate_max_concurrent: int = Field(512, ge=1)
    """gRPC Generate streams in flight at most; more are refused RESOURCE_EXHAUSTED at once
    (retryable backpressure, as the HTTP front's 429 past `http.max_concurrent`). The training
    worker's requests are not counted: they go to the engine directly, bounded by
    `leases_in_flight`."""
    http: HttpConfig = HttpConfig()
    """The OpenAI-compatible HTTP front."""
    auth: AuthConfig = AuthConfig()
    """Who may call this server (clients need role client, learner or rollout)."""
    tls: TLSConfig = TLSConfig()
    """Optional TLS for this server."""
    client_tls: ClientTLSConfig = ClientTLSConfig()
    """TLS to the services this one calls (broker, learner): set `ca_file` to speak TLS to them."""
    log_level: str = "INFO"
    """Python logging level."""


    @model_validator(mode="after")
    def _distinct_learners(self) -> RolloutConfig:
        addresses = [t.address for t in self.learner_targets()]
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"a learner is named twice in learner/learners: {addresses}")
        return self

    def learner_targets(self) -> list[LearnerTarget]:
        """Every learner to lease from (`learner` first, weight 1, then `learners`)."""
        return ([LearnerTarget(address=self.learner)] if self.learner else []) + list(self.learners)


ALIASES = {"http-port": "http.port", "port": "server.port", "host": "server.host", "model": "engine.model", "follow": "adapters.follow"}
