"""The Rollout gRPC service (Generate, ListAdapters, WatchAdapters) and the process that runs it: one vLLM
engine, the adapter manager and follower, and optionally the training loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from loraloop.v1 import rollout_pb2 as pb
from loraloop.v1 import rollout_pb2_grpc as pb_grpc
from services.broker.client import BrokerClient
from services.common.errors import InvalidArgument, NotFound
from services.common.grpc_server import Registration, serve
from services.rollout.adapters import AdapterManager, BaseModel, default_cache_dir
from services.rollout.config import RolloutConfig
from services.rollout.engine import Engine, Sampling
from services.rollout.follower import Follower

log = logging.getLogger(__name__)
SERVICE = "loraloop.v1.Rollout"
_ANY = frozenset({"client", "learner", "rollout"})
ROLES_OF_METHOD = {f"/{SERVICE}/Generate": _ANY, f"/{SERVICE}/ListAdapters": _ANY,
                   f"/{SERVICE}/WatchAdapters": _ANY}
MAX_N = 64


def sampling_from_pb(p: pb.SamplingParams, default_max_tokens: int) -> Sampling:
    if p.temperature < 0 or not (0 <= p.top_p <= 1):
        raise InvalidArgument("temperature must be >= 0 and top_p in [0, 1]")
    if p.n > MAX_N:
        raise InvalidArgument(f"n={p.n} exceeds {MAX_N}")
    if p.n > 1 and p.temperature == 0:
        raise InvalidArgument(f"n={p.n} samples need temperature > 0 (greedy gives one answer)")
    return Sampling(
        max_tokens=p.max_tokens or default_max_tokens, temperature=p.temperature, top_p=p.top_p or 1.0,
        top_k=p.top_k if p.top_k > 0 else -1, n=p.n or 1, seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop), stop_token_ids=tuple(p.stop_token_ids), logprobs=p.logprobs,
        ignore_eos=p.ignore_eos,
    )


class TokenCodec:
    """Tokenizer of the base model (for text prompts) and its vocabulary size."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.vocab_size = int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def check(self, ids: list[int], max_model_len: int, max_tokens: int) -> None:
        if not ids:
            raise InvalidArgument("empty prompt")
        bad = [i for i in ids if i >= self.vocab_size]
        if bad:
            raise InvalidArgument(f"token ids {bad[:5]} outside the vocabulary (size {self.vocab_size})")
        if len(ids) + max_tokens > max_model_len:
            raise InvalidArgument(f"prompt {len(ids)} + max_tokens {max_tokens} > max_model_len {max_model_len}")


class RolloutServicer(pb_grpc.RolloutServicer):
    def __init__(self, engine: Engine, manager: AdapterManager, codec: TokenCodec, cfg: RolloutConfig) -> None:
        self.engine, self.manager, self.codec, self.cfg = engine, manager, codec, cfg

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        sampling = sampling_from_pb(request.params, 64)
        ids = list(request.token_ids.ids) if request.HasField("token_ids") else self.codec.encode(request.text)
        self.codec.check(ids, self.cfg.engine.max_model_len, sampling.max_tokens)
        rid = request.request_id or uuid.uuid4().hex
        async with self.manager.acquire(request.adapter) as lv:
            name, version = (lv.record.name, lv.record.version) if lv else ("", 0)
            async for d in self.engine.generate(ids, sampling, lv.handle if lv else None, rid):
                yield pb.GenerateResponse(
                    index=d.index, token_ids=d.token_ids, text=d.text, logprobs=d.logprobs,
                    finished=d.finished, finish_reason=d.finish_reason, adapter_name=name,
                    adapter_version=version, prompt_tokens=len(ids),
                )

    async def ListAdapters(self, request: pb.ListLoadedRequest, context) -> pb.ListLoadedResponse:
        return self._snapshot()

    async def WatchAdapters(self, request: pb.ListLoadedRequest, context) -> AsyncIterator[pb.ListLoadedResponse]:
        while True:
            changed = self.manager.changed()  # before the snapshot: no change slips in between
            yield self._snapshot()
            await changed.wait()

    def _snapshot(self) -> pb.ListLoadedResponse:
        m = self.manager
        return pb.ListLoadedResponse(
            adapters=[pb.LoadedAdapter(name=n, version=v, active_requests=lv.active,
                                       latest=m.latest.get(n) == v, followed=n in m.followed)
                      for (n, v), lv in sorted(m.loaded.items())],
            refused=[pb.RefusedAdapter(name=n, version=v, reason=r) for (n, v), r in sorted(m.refused.items())],
            base_model_fingerprint=m.base.fingerprint, max_lora_rank=m.base.max_lora_rank,
        )


async def catch_up(manager: AdapterManager, follower: Follower, name: str) -> None:
    """Load the newest version of `name` (if any), then follow it from there."""
    with contextlib.suppress(NotFound):
        await manager.on_published((await manager._fetch(f"{name}@latest"))[0])
    follower.follow(name, manager.latest.get(name, 0))


async def run(cfg: RolloutConfig) -> None:
    token = os.environ.get(cfg.token_env)
    broker = BrokerClient(cfg.broker, token)
    engine = Engine(cfg.engine)
    manager = None
    try:
        await engine.start()
        base = BaseModel.from_dir(cfg.engine.model, cfg.engine.max_lora_rank)
        cache = Path(cfg.adapters.dir) if cfg.adapters.dir else default_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        manager = AdapterManager(engine, broker, base, cache)
        follower = Follower(broker, manager, asyncio.get_running_loop())
        manager.on_first_use = lambda name: follower.follow(name, manager.latest.get(name, 0))
        for name in cfg.adapters.follow:
            await catch_up(manager, follower, name)
        codec = TokenCodec(cfg.engine.model)
        worker_task = None
        if cfg.learner:
            from services.rollout.worker import RolloutWorker

            worker = RolloutWorker(cfg, engine, manager, codec, token,
                                   cfg.worker_id or f"{socket.gethostname()}-{os.getpid()}")
            worker_task = asyncio.create_task(worker.run())

        def started(port: int) -> None:
            print(f"loraloop rollout listening on {cfg.server.host}:{port} (base {base.fingerprint[:19]}…)", flush=True)

        async def stopping() -> None:
            if worker_task:
                worker_task.cancel()
            follower.stop()

        await serve([Registration(pb_grpc.add_RolloutServicer_to_server,
                                  RolloutServicer(engine, manager, codec, cfg), SERVICE)],
                    cfg.server, cfg.auth, cfg.tls, ROLES_OF_METHOD, on_started=started, on_stopping=stopping)
    finally:
        engine.shutdown()  # also when the start failed: its children and sockets go too
        if manager is not None:
            manager.close()
        broker.close()
        reap_children()


def reap_children(timeout_s: float = 10.0) -> None:
    """vLLM's engine runs in child processes; do not exit before they have (a stopped
    server leaves nothing behind)."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.join(timeout_s)
        if child.is_alive():
            log.warning("engine process %d did not exit; killing it", child.pid)
            child.kill()
            child.join(5)
