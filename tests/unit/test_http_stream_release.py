"""A streamed OpenAI response lets go of its adapter version however it ends, also when the
client is gone before the first chunk (the body generator then never starts)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from starlette.requests import ClientDisconnect

from services.rollout.http_front import _HeldStream, _Release


class Front:
    def __init__(self) -> None:
        self.done: list[str] = []

    def _done(self, endpoint: str, label: str, status: str, t0: float) -> None:
        self.done.append(status)


def _response(front: Front, held: list[str]):
    stack = contextlib.AsyncExitStack()
    stack.callback(held.append, "released")
    release = _Release(front, stack, "completions", "oa", 0.0)  # type: ignore[arg-type]
    started = []

    async def body():
        started.append(True)
        try:
            for k in range(3):
                yield f"data: {k}\n\n"
        finally:
            await release("200")

    return _HeldStream(body(), release, media_type="text/event-stream"), started


def test_a_client_gone_before_the_first_chunk_releases_the_version():
    front, held = Front(), []
    resp, started = _response(front, held)

    async def send(message):
        raise OSError("connection reset")  # the headers cannot be sent

    async def receive():
        return {"type": "http.disconnect"}

    with pytest.raises(ClientDisconnect):
        asyncio.run(resp({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send))
    assert not started and held == ["released"] and front.done == ["cancelled"]


def test_a_complete_stream_releases_once_with_its_status():
    front, held, sent = Front(), [], []
    resp, started = _response(front, held)

    async def send(message):
        sent.append(message)

    async def receive():
        await asyncio.sleep(10)

    asyncio.run(resp({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send))
    assert started and held == ["released"] and front.done == ["200"]
    assert sum(1 for m in sent if m.get("body")) == 3
