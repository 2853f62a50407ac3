"""WeightedSlots: a replica's leases in flight shared by several learners (runs) by weight."""

from __future__ import annotations

import asyncio

import pytest

from services.rollout.config import RolloutConfig
from services.rollout.worker import WeightedSlots


def _saturate(weights: dict[str, float], total: int, rounds: int) -> dict[str, int]:
    """Every key always wants another slot; each holder releases after one tick. Returns the
    grants per key after `rounds` releases."""

    async def main() -> dict[str, int]:
        slots = WeightedSlots(total, weights)
        done = asyncio.Event()
        releases = 0

        async def client(key: str) -> None:
            nonlocal releases
            while not done.is_set():
                await slots.acquire(key)
                await asyncio.sleep(0)
                releases += 1
                slots.release(key)
                if releases >= rounds:
                    done.set()

        tasks = [asyncio.create_task(client(k)) for k in weights for _ in range(total)]
        await done.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return slots.granted

    return asyncio.run(main())


def test_saturated_share_follows_weights():
    granted = _saturate({"a": 3.0, "b": 1.0}, total=4, rounds=400)
    share = granted["a"] / (granted["a"] + granted["b"])
    assert 0.70 <= share <= 0.80, granted  # 3:1


def test_equal_weights_share_equally():
    granted = _saturate({"a": 1.0, "b": 1.0, "c": 1.0}, total=3, rounds=300)
    assert max(granted.values()) - min(granted.values()) <= 3, granted


def test_one_key_alone_may_hold_every_slot_and_the_other_gets_the_next_free_one():
    async def main() -> None:
        slots = WeightedSlots(2, {"a": 1.0, "b": 1.0})
        await slots.acquire("a")
        await slots.acquire("a")  # b wants nothing: a may use both
        assert slots.held == {"a": 2, "b": 0} and slots.free == 0
        b = asyncio.create_task(slots.acquire("b"))
        a = asyncio.create_task(slots.acquire("a"))
        await asyncio.sleep(0)
        assert not b.done() and not a.done()  # nobody is preempted
        slots.release("a")
        await asyncio.sleep(0)
        assert b.done() and not a.done()  # the free slot goes to the key below its share
        slots.release("a")
        await asyncio.sleep(0)
        assert a.done() and slots.held == {"a": 1, "b": 1}

    asyncio.run(main())


def test_a_cancelled_waiter_gives_nothing_away():
    async def main() -> None:
        slots = WeightedSlots(1, {"a": 1.0, "b": 1.0})
        await slots.acquire("a")
        waiter = asyncio.create_task(slots.acquire("b"))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        slots.release("a")
        assert slots.free == 1 and slots.held == {"a": 0, "b": 0}
        with pytest.raises(RuntimeError, match="release without acquire"):
            slots.release("b")

    asyncio.run(main())


def test_bad_weights_refused():
    with pytest.raises(ValueError):
        WeightedSlots(2, {"a": 0.0})
    with pytest.raises(ValueError):
        WeightedSlots(0, {"a": 1.0})


def test_learner_targets_from_config():
    cfg = RolloutConfig(learner="h:1", learners=[{"address": "h:2", "weight": 3}])
    assert [(t.address, t.weight) for t in cfg.learner_targets()] == [("h:1", 1.0), ("h:2", 3.0)]
    assert RolloutConfig().learner_targets() == []
    with pytest.raises(ValueError, match="named twice"):
        RolloutConfig(learner="h:1", learners=[{"address": "h:1"}])
    with pytest.raises(ValueError):
        RolloutConfig(learners=[{"address": "h:2", "weight": 0}])
