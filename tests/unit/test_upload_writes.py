"""The broker's staging writes (services.broker.registry.Upload): they run behind the receive,
in place into a string of the upload's full size, chunks queued meanwhile batched into one
round trip; a Redis error stops the upload with UNAVAILABLE instead of hanging it. A fake
Redis (a bytearray with SETRANGE semantics) stands in for the real one, which the integration
tests use."""

from __future__ import annotations

import asyncio
import json

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from services.broker.config import RegistryConfig
from services.broker.registry import WRITES_AHEAD, PublishIntent, Upload
from services.common.errors import Unavailable


class FakePipeline:
    def __init__(self, redis: FakeRedis) -> None:
        self.redis, self.ops = redis, []

    async def __aenter__(self) -> FakePipeline:
        return self

    async def __aexit__(self, *exc) -> None:
        return None

    def setrange(self, key: str, offset: int, value: bytes) -> None:
        self.ops.append((key, offset, value))

    def expire(self, key: str, seconds: int) -> None:
        pass

    async def execute(self) -> None:
        self.redis.round_trips += 1
        if self.redis.round_trips == self.redis.fail_at:
            raise RedisConnectionError("connection refused")
        await asyncio.sleep(self.redis.delay_s)  # a slow Redis: chunks queue behind it
        for key, offset, value in self.ops:
            buf = self.redis.store.setdefault(key, bytearray())
            if len(buf) < offset + len(value):
                buf.extend(b"\0" * (offset + len(value) - len(buf)))
            buf[offset : offset + len(value)] = value


class FakeRedis:
    def __init__(self, delay_s: float = 0.0, fail_at: int = 0) -> None:
        self.store: dict[str, bytearray] = {}
        self.round_trips = 0
        self.delay_s, self.fail_at = delay_s, fail_at

    def pipeline(self, transaction: bool = False) -> FakePipeline:
        return FakePipeline(self)

    async def delete(self, key: str) -> None:
        self.store.pop(key, None)


class FakeRegistry:
    def __init__(self, redis: FakeRedis) -> None:
        self.redis, self.cfg, self.relay = redis, RegistryConfig(), None


def _upload(redis: FakeRedis, size: int) -> Upload:
    intent = PublishIntent("n", 1, "fp", 0, json.dumps({"r": 4}), size, "0" * 64)
    up = Upload(FakeRegistry(redis), intent, {})  # type: ignore[arg-type]
    up.header = object()  # type: ignore[assignment]  # skip the safetensors parse: not under test here
    return up


def test_chunks_land_in_place_and_queued_ones_share_a_round_trip():
    data = bytes(range(256)) * 40  # 10 KiB in 10 chunks
    chunks = [data[i : i + 1024] for i in range(0, len(data), 1024)]
    redis = FakeRedis(delay_s=0.02)

    async def scenario() -> Upload:
        up = _upload(redis, len(data))
        for c in chunks:
            await up.append(c)
        await up._written()
        return up

    up = asyncio.run(scenario())
    assert bytes(redis.store[up.key]) == data
    assert redis.round_trips < len(chunks)  # batched while Redis was busy


def test_a_redis_error_mid_upload_is_unavailable_not_a_hang():
    data = b"x" * (1024 * (WRITES_AHEAD + 6))
    redis = FakeRedis(delay_s=0.01, fail_at=2)

    async def scenario() -> None:
        up = _upload(redis, len(data))
        try:
            for i in range(0, len(data), 1024):
                await up.append(data[i : i + 1024])
            await up.commit()
        finally:
            await up.abort()

    with pytest.raises(Unavailable, match="redis unavailable"):
        asyncio.run(asyncio.wait_for(scenario(), 10))
