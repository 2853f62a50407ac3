"""Retention (issue 2, point 5): after 50 publishes with keep_last=5 and one pinned
version, exactly 6 versions' bytes remain in Redis."""

from __future__ import annotations

import pytest

from services.broker.client import BrokerClient
from services.common.errors import NotFound
from tests.support.adapters import make_adapter
from tests.support.procs import TOKENS

FP = "sha256:" + "ef" * 32


def test_retention_keeps_last_k_plus_pinned(broker_factory, redis_proc):
    broker = broker_factory("--registry.keep_last=5")
    with BrokerClient(broker.target, TOKENS["learner"]) as c:
        epoch, _ = c.acquire_publisher("ret")
        shas = {}
        for i in range(50):
            rec, _ = c.publish_bytes("ret", epoch, *make_adapter(seed=i), FP, learner_step=i)
            shas[rec.version] = rec.sha256
            if rec.version == 3:
                assert c.pin("ret@v3").pinned
        records, latest = c.list_versions("ret")
        assert latest == 50
        assert [r.version for r in records] == [3, 46, 47, 48, 49, 50]
        assert [r.pinned for r in records] == [True] + [False] * 5
        r = redis_proc.client()
        blobs = {k.decode().removeprefix("ll:blob:") for k in r.scan_iter("ll:blob:*")}
        assert blobs == {shas[v] for v in (3, 46, 47, 48, 49, 50)}
        assert len(blobs) == 6
        assert not list(r.scan_iter("ll:staging:*"))
        # a retired version is NOT_FOUND, the pinned one is still served
        with pytest.raises(NotFound, match="retired"):
            c.fetch("ret@v10")
        assert c.fetch("ret@v3")[0].sha256 == shas[3]
        # unpinning hands it to retention at once
        c.unpin("ret@v3")
        assert [x.version for x in c.list_versions("ret")[0]] == [46, 47, 48, 49, 50]
        assert len(list(r.scan_iter("ll:blob:*"))) == 5
        assert r.xlen("ll:a:ret:events") == 50  # the event history stays complete
        r.close()


def test_equal_bytes_share_one_blob_until_both_retire(broker_factory, redis_proc):
    broker = broker_factory("--registry.keep_last=2")
    cfg, data = make_adapter(seed=42)
    with BrokerClient(broker.target, TOKENS["learner"]) as c:
        epoch, _ = c.acquire_publisher("same")
        c.publish_bytes("same", epoch, cfg, data, FP)
        c.publish_bytes("same", epoch, cfg, data, FP)
        r = redis_proc.client()
        assert len(list(r.scan_iter("ll:blob:*"))) == 1
        c.publish_bytes("same", epoch, *make_adapter(seed=1), FP)  # retires v1; v2 still uses the blob
        assert c.fetch("same@v2")[1] == data
        c.publish_bytes("same", epoch, *make_adapter(seed=2), FP)  # retires v2 -> blob freed
        assert len(list(r.scan_iter("ll:blob:*"))) == 2
        r.close()
