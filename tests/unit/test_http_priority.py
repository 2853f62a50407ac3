"""The HTTP front's priority rule: a user may ask for a later vLLM priority, never an earlier
one than `rollout.priority.users`; the header vLLM would read is taken off the request."""

from __future__ import annotations

from types import SimpleNamespace

from starlette.requests import Request

from services.rollout.http_front import OpenAIFront


def _request(headers: dict[str, str]) -> Request:
    scope = {"type": "http", "method": "POST", "path": "/v1/completions",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    return Request(scope)


def _apply(min_priority: int, body_priority: int, headers: dict[str, str]) -> tuple[int, Request]:
    front = SimpleNamespace(min_priority=min_priority)
    req = SimpleNamespace(priority=body_priority)
    out = OpenAIFront._prioritize(front, req, _request(headers))  # type: ignore[arg-type]
    return req.priority, out


def test_users_cannot_jump_ahead_of_their_configured_priority():
    assert _apply(0, -10, {})[0] == 0
    assert _apply(-1, 0, {})[0] == 0  # later than the floor: as asked
    assert _apply(-1, -5, {})[0] == -1


def test_the_vllm_priority_header_is_floored_and_removed():
    prio, out = _apply(2, 0, {"X-Vllm-Priority": "-3", "Authorization": "Bearer t"})
    assert prio == 2
    assert "x-vllm-priority" not in out.headers and out.headers["authorization"] == "Bearer t"
    assert _apply(0, 0, {"X-Vllm-Priority": "7"})[0] == 7
    assert _apply(0, 4, {"X-Vllm-Priority": "not-a-number"})[0] == 4
