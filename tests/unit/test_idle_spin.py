"""idle_spin bounds how long vLLM's shared-memory queue readers busy-wait (the real vLLM class;
the end-to-end check, an idle rollout server using no CPU, is in test_rollout_engine.py)."""

from __future__ import annotations

import pytest
import zmq

from services.rollout import idle_spin


def test_the_bound_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(idle_spin.ENV, raising=False)
    assert idle_spin.spin_limit_s() == idle_spin.DEFAULT_MS / 1000
    monkeypatch.setenv(idle_spin.ENV, "2.5")
    assert idle_spin.spin_limit_s() == 0.0025
    for bad in ("-1", "nan", "soon"):
        monkeypatch.setenv(idle_spin.ENV, bad)
        with pytest.raises(ValueError):
            idle_spin.spin_limit_s()


@pytest.fixture
def spin_condition(monkeypatch, tmp_path):
    from vllm.distributed.device_communicators import shm_broadcast

    cls = shm_broadcast.SpinCondition
    monkeypatch.setattr(cls, "__init__", cls.__init__)  # put vLLM's back afterwards
    ctx = zmq.Context()

    def make(is_reader: bool):
        return cls(is_reader=is_reader, context=ctx, notify_address=f"ipc://{tmp_path}/notify")

    yield make
    ctx.destroy(linger=0)


def test_readers_spin_at_most_the_bound_and_writers_are_untouched(spin_condition):
    make = spin_condition
    assert make(True).busy_loop_s == 1  # vLLM 0.32's own: a second
    assert idle_spin.install(0.05)
    assert make(True).busy_loop_s == 0.05
    assert make(False).busy_loop_s == 0  # writers never wait
    assert idle_spin.install(0.01)  # installing again replaces the bound, does not stack wrappers
    assert make(True).busy_loop_s == 0.01
    assert idle_spin.install(5.0)  # never longer than vLLM's own
    assert make(True).busy_loop_s == 1
