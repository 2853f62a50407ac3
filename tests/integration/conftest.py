"""Session-wide real stack for the rollout tests: Redis, broker, the tiny model, and one
rollout server (vLLM CPU engine start is the expensive part, so it is shared)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.procs import TOKENS, BrokerProc, RedisProc, RolloutProc


@dataclass
class Stack:
    workdir: Path
    model: Path
    fingerprint: str
    redis: RedisProc
    broker: BrokerProc
    rollout: RolloutProc | None = None


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from services.common.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0)


@pytest.fixture(scope="session")
def base_stack(tmp_path_factory, tiny_model) -> Stack:
    from services.common.fingerprint import model_fingerprint

    work = tmp_path_factory.mktemp("stack")
    redis = RedisProc(work / "redis")
    broker = BrokerProc(redis.url, work, "--registry.keep_last=50")
    stack = Stack(work, tiny_model, model_fingerprint(tiny_model), redis, broker)
    yield stack
    broker.stop()
    redis.stop()


@pytest.fixture(scope="session")
def rollout_stack(base_stack) -> Stack:
    base_stack.rollout = RolloutProc(base_stack.model, base_stack.broker.target, base_stack.workdir,
                                     '--follow=["hot", "keep"]', "--engine.max_lora_rank=16",
                                     "--engine.max_loras=4")
    yield base_stack
    base_stack.rollout.stop()


CLIENT_MD = (("authorization", f"Bearer {TOKENS['client']}"),)
