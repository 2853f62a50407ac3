"""LeasePrompts as a long poll: with nothing to hand out, the learner holds the call up to
`wait_ms` and answers the moment the lease table (or the end of training) lets a lease
through, from whichever thread made the change."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from loraloop.v1 import learner_pb2 as pb
from loraloop.v1 import rollout_pb2 as rpb
from services.learner import service
from services.learner.leases import LeaseTable
from services.learner.service import LearnerServicer

pytestmark = pytest.mark.unit


def _servicer() -> tuple[LeaseTable, LearnerServicer]:
    table = LeaseTable(adapter_name="", samples_per_group=2, groups_per_batch=2, vocab_size=100, max_staleness=0)
    for k in range(2):
        table.add(f"p{k}", [1, 2, 3])
    return table, LearnerServicer(table, rpb.SamplingParams(max_tokens=3, n=2), "arithmetic")


def _ask(s: LearnerServicer, wait_ms: int) -> pb.LeaseResponse:
    return asyncio.run(s.LeasePrompts(pb.LeaseRequest(worker_id="w", max_groups=8, wait_ms=wait_ms), None))


def _later(seconds: float, fn) -> threading.Timer:
    t = threading.Timer(seconds, fn)
    t.start()
    return t


def test_without_wait_a_refusal_comes_at_once():
    _table, s = _servicer()
    assert [g.group_id for g in _ask(s, 0).leases[0].groups] == ["p0:1", "p1:2"]
    r = _ask(s, 0)  # every group is out, and max_staleness 0 allows no more
    assert not r.leases and not r.finished and r.retry_after_ms == 200


def test_a_waiting_call_gets_the_lease_a_change_on_another_thread_frees(monkeypatch):
    # No periodic re-check while waiting: only the table's notification can end the wait early.
    monkeypatch.setattr(service, "_RECHECK_S", 60.0)
    monkeypatch.setattr(service, "MAX_LEASE_WAIT_S", 60.0)
    table, s = _servicer()
    _ask(s, 0)
    timer = _later(0.3, table.expire_leases)  # the training thread, e.g. after a learner restart
    t0 = time.monotonic()
    r = _ask(s, 30_000)
    timer.join()
    assert [g.group_id for g in r.leases[0].groups] == ["p0:1", "p1:2"]
    assert time.monotonic() - t0 < 5  # woken by the change, not by the end of the 30 s wait


def test_the_end_of_training_wakes_a_waiting_call(monkeypatch):
    monkeypatch.setattr(service, "_RECHECK_S", 60.0)
    monkeypatch.setattr(service, "MAX_LEASE_WAIT_S", 60.0)
    _table, s = _servicer()
    _ask(s, 0)

    def finish() -> None:
        s.finished = True

    timer = _later(0.3, finish)
    t0 = time.monotonic()
    r = _ask(s, 30_000)
    timer.join()
    assert r.finished and not r.leases and time.monotonic() - t0 < 5


def test_a_wait_with_nothing_changing_ends_in_a_refusal():
    _table, s = _servicer()
    _ask(s, 0)
    t0 = time.monotonic()
    r = _ask(s, 400)
    assert not r.leases and not r.finished and r.retry_after_ms == 200
    assert time.monotonic() - t0 >= 0.35  # it did wait


def test_the_wait_is_capped_by_the_learner(monkeypatch):
    monkeypatch.setattr(service, "MAX_LEASE_WAIT_S", 0.5)
    _table, s = _servicer()
    _ask(s, 0)
    t0 = time.monotonic()
    r = _ask(s, 0xFFFFFFFF)  # a client may ask for any uint32
    assert not r.leases and 0.45 <= time.monotonic() - t0 < 5


def test_a_long_poll_counts_one_refusal_per_call():
    table, s = _servicer()
    _ask(s, 0)
    _ask(s, 0)
    _ask(s, 600)  # looks again several times (the re-check every 0.25 s) and answers once
    assert table.stats()["lease_refused_nothing_pending"] == 2
