"""Bound how long vLLM's engine processes busy-wait once they run out of work (CPU build).

vLLM's engine processes hand work to each other through shared-memory queues
(`vllm.distributed.device_communicators.shm_broadcast.MessageQueue`). A reader that finds its
queue empty spins (`sched_yield` in a loop) until `busy_loop_s` has passed since its last
message, and only then sleeps on a zmq socket; vLLM 0.32 fixes that at 1 s. A GPU host loses an
idle core to it; a 2-core CPU host loses half the machine for a second after every burst of
work, while the broker, the learner or the server's next adapter fetch need that core
(tests/integration/test_rollout_engine.py checks an idle engine does not spin).

`register` (a `vllm.general_plugins` entry point, so it runs in every vLLM process) lowers
`busy_loop_s` of every reader to `LORALOOP_IDLE_SPIN_MS` (`engine.idle_spin_ms`, which
Engine.start exports). The bound must stay above the gaps between messages while a batch is
generated, or readers fall asleep between steps and throughput collapses: DEFAULT_MS kept it
within run-to-run noise of vLLM's 1 s (figures: docs/benchmarks-notes.md). Only the CPU
platform is changed; `LORALOOP_IDLE_SPIN_MS=1000` is vLLM's own.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os

# Under vLLM's logger: in the engine processes only vLLM's handlers are configured.
log = logging.getLogger("vllm.loraloop.idle_spin")

ENV = "LORALOOP_IDLE_SPIN_MS"
DEFAULT_MS = 50.0
_PATCHED = "_loraloop_idle_spin_s"


def spin_limit_s() -> float:
    """The bound in seconds from LORALOOP_IDLE_SPIN_MS (DEFAULT_MS when unset); ValueError if bad."""
    raw = os.environ.get(ENV, "").strip()
    ms = DEFAULT_MS if not raw else float(raw)
    if not ms >= 0:  # also NaN
        raise ValueError(f"{ENV}={raw!r}: milliseconds >= 0 expected")
    return ms / 1000.0


def install(limit_s: float) -> bool:
    """Make every SpinCondition reader created from now on in this process spin at most
    `limit_s` (never longer than vLLM's own value); True if in place."""
    try:
        from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    except ImportError as e:
        log.warning("idle spin not bounded: %s", e)
        return False
    params = inspect.signature(SpinCondition.__init__).parameters
    if "busy_loop_s" not in params or "is_reader" not in params:
        log.warning("idle spin not bounded: vLLM's SpinCondition(%s) has no busy_loop_s/is_reader",
                    ", ".join(params))
        return False
    stock = SpinCondition.__init__
    if hasattr(stock, _PATCHED):  # ours from an earlier install: wrap vLLM's own, not ours again
        stock = stock.__wrapped__

    @functools.wraps(stock)
    def __init__(self, *args, **kwargs):
        stock(self, *args, **kwargs)
        if getattr(self, "is_reader", False):
            self.busy_loop_s = min(self.busy_loop_s, limit_s)

    setattr(__init__, _PATCHED, limit_s)
    SpinCondition.__init__ = __init__
    return True


def register() -> None:
    """`vllm.general_plugins` entry point: vLLM calls it in every process it starts."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        install(spin_limit_s())
