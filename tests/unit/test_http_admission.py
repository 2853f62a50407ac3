"""The HTTP front's in-flight bound (http.max_concurrent) holds while requests are still sending
their bodies: the slot is taken at the check. Taken after the body was read, every request that
arrived meanwhile passed the check (bench load: 640 streams against 512 had ~630 in flight)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from pydantic import BaseModel
from starlette.requests import Request

from services.rollout.http_front import OpenAIFront
from services.rollout.metrics import RolloutMetrics


class _Handlers:
    ClientError = type("ClientError", (Exception,), {})

    def error(self, message: str, status: int, param=None):
        return SimpleNamespace(model_dump=lambda: {"error": {"message": message, "code": status}})


class _Body(BaseModel):
    prompt: str


def _front(max_concurrent: int) -> OpenAIFront:
    front = OpenAIFront.__new__(OpenAIFront)  # the admission path only: no engine, no vLLM handlers
    front.h, front.metrics = _Handlers(), RolloutMetrics()
    front.policy = SimpleNamespace(check=lambda path, headers: None)
    front.max_concurrent, front.in_flight, front.stopping, front.min_priority = max_concurrent, 0, False, 0
    return front


def _request(body_sent: asyncio.Event) -> Request:
    async def receive():
        await body_sent.wait()  # a slow client: its body arrives when the test says so
        return {"type": "http.request", "body": b"not json", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "query_string": b""}
    return Request(scope, receive)


def test_requests_still_sending_their_bodies_hold_their_slots():
    async def main():
        front = _front(max_concurrent=2)
        body_sent = asyncio.Event()
        create = None
        slow = [asyncio.create_task(front._generate(_request(body_sent), "completions", _Body, create)) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert front.in_flight == 2
        third = await front._generate(_request(asyncio.Event()), "completions", _Body, create)
        assert third.status_code == 429 and "2 requests in flight" in json.loads(third.body)["error"]["message"]
        body_sent.set()
        done = await asyncio.gather(*slow)
        assert [r.status_code for r in done] == [400, 400]  # not JSON: refused, and the slot given back
        assert front.in_flight == 0

    asyncio.run(main())
