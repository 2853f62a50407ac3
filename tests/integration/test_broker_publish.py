"""Publishing: atomic, gap-free numbering under concurrency; every bad publish refused
with its status code and without a trace (issue 2, points 1 and 2)."""

from __future__ import annotations

import hashlib
import threading

import grpc
import pytest

from loraloop.v1 import adapters_pb2 as pb
from loraloop.v1 import adapters_pb2_grpc as pb_grpc
from services.broker.client import BrokerClient
from services.common.errors import DataLoss, FailedPrecondition, NotFound
from tests.support.adapters import config_json, make_adapter
from tests.support.procs import TOKENS

FP = "sha256:" + "ab" * 32
LEARNER = (("authorization", f"Bearer {TOKENS['learner']}"),)


def test_concurrent_publishers_get_versions_1_to_160(broker_factory, redis_proc):
    broker = broker_factory("--registry.keep_last=1000")
    with BrokerClient(broker.target, TOKENS["learner"]) as admin:
        epoch, latest = admin.acquire_publisher("conc")
    assert latest == 0
    sent: dict[int, str] = {}  # version -> sha256 the publisher sent
    lock = threading.Lock()
    errors: list[BaseException] = []

    def publisher(worker: int) -> None:
        try:
            with BrokerClient(broker.target, TOKENS["learner"]) as c:
                for i in range(20):
                    cfg, data = make_adapter(seed=worker * 1000 + i)
                    rec, dedup = c.publish_bytes("conc", epoch, cfg, data, FP, learner_step=i)
                    assert not dedup
                    with lock:
                        assert rec.version not in sent, f"version {rec.version} handed out twice"
                        sent[rec.version] = hashlib.sha256(data).hexdigest()
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=publisher, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(sent) == list(range(1, 161))

    with BrokerClient(broker.target, TOKENS["rollout"]) as reader:
        records, latest = reader.list_versions("conc")
        assert latest == 160 and [r.version for r in records] == list(range(1, 161))
        for r in records:
            assert r.sha256 == sent[r.version]
            assert r.publisher_epoch == epoch and r.rank == 4
            assert r.target_modules == ("q_proj", "v_proj")
        for v in (1, 77, 160):  # bytes served back match their record
            rec, data = reader.fetch(f"conc@v{v}")
            assert hashlib.sha256(data).hexdigest() == rec.sha256 == sent[v]
            assert len(data) == rec.size_bytes


def _raw_publish(target: str, header: pb.PublishHeader, data: bytes, chunk: int = 4096):
    def reqs():
        yield pb.PublishRequest(header=header)
        for off in range(0, len(data), chunk):
            yield pb.PublishRequest(chunk=data[off : off + chunk])

    with grpc.insecure_channel(target) as ch:
        return pb_grpc.AdapterRegistryStub(ch).Publish(reqs(), metadata=LEARNER, timeout=30)


def _header(name: str, epoch: int, cfg: dict, data: bytes, **over) -> pb.PublishHeader:
    h = dict(name=name, epoch=epoch, base_model_fingerprint=FP, adapter_config_json=config_json(cfg),
             size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    h.update(over)
    return pb.PublishHeader(**h)


def _snapshot(redis_proc) -> dict:
    r = redis_proc.client()
    snap = {
        "staging": sorted(r.scan_iter("ll:staging:*")),
        "blobs": sorted(r.scan_iter("ll:blob:*")),
        "latest": r.hget("ll:a:good", "latest"),
        "versions": r.zrange("ll:a:good:versions", 0, -1),
        "events": r.xlen("ll:a:good:events"),
        "names": sorted(r.smembers("ll:names")),
    }
    r.close()
    return snap


BAD_CASES = {
    "wrong sha256": (lambda e, cfg, data: (_header("good", e, cfg, data, sha256="0" * 64), data),
                     grpc.StatusCode.INVALID_ARGUMENT, "sha256 mismatch"),
    "truncated stream": (lambda e, cfg, data: (_header("good", e, cfg, data), data[: len(data) // 2]),
                         grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
    "header/config rank mismatch": (
        lambda e, cfg, data: (_header("good", e, dict(cfg, r=8, lora_alpha=16), data), data),
        grpc.StatusCode.INVALID_ARGUMENT, "config declares r=8"),
    "module not in target_modules": (
        lambda e, cfg, data: (_header("good", e, dict(cfg, target_modules=["q_proj"]), data), data),
        grpc.StatusCode.INVALID_ARGUMENT, "not among target_modules"),
    "not safetensors": (lambda e, cfg, data: (_header("good", e, cfg, b"\xff" * 64), b"\xff" * 64),
                        grpc.StatusCode.INVALID_ARGUMENT, "header length"),
    "oversize": (lambda e, cfg, data: (_header("good", e, cfg, data, size_bytes=10**9), data),
                 grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeds the limit"),
    "path-like name": (lambda e, cfg, data: (_header("../x", e, cfg, data), data),
                       grpc.StatusCode.INVALID_ARGUMENT, "invalid adapter name"),
    "stale epoch": (lambda e, cfg, data: (_header("good", e - 1, cfg, data), data),
                    grpc.StatusCode.FAILED_PRECONDITION, "stale publisher epoch"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_publish_is_refused_without_trace(case, broker_factory, redis_proc):
    broker = broker_factory("--registry.max_adapter_bytes=1000000")
    cfg, data = make_adapter(seed=1)
    with BrokerClient(broker.target, TOKENS["learner"]) as c:
        c.acquire_publisher("good")
        epoch, _ = c.acquire_publisher("good")  # epoch 2, so epoch 1 is stale
        c.publish_bytes("good", epoch, cfg, data, FP)
        before = _snapshot(redis_proc)
        build, code, text = BAD_CASES[case]
        bad_cfg, bad_data = make_adapter(seed=2)
        header, payload = build(epoch, bad_cfg, bad_data)
        with pytest.raises(grpc.RpcError) as err:
            _raw_publish(broker.target, header, payload)
        assert err.value.code() == code, err.value.details()
        assert text in err.value.details()
        assert _snapshot(redis_proc) == before
        assert c.get("good").version == 1
        # the broker still works after the refusal
        rec, _ = c.publish_bytes("good", epoch, *make_adapter(seed=3), FP)
        assert rec.version == 2


def test_retried_publish_is_committed_once(broker, redis_proc):
    cfg, data = make_adapter(seed=5)
    with BrokerClient(broker.target, TOKENS["learner"]) as c:
        epoch, _ = c.acquire_publisher("idem")
        first, dedup1 = c.publish_bytes("idem", epoch, cfg, data, FP, publish_id="step-1")
        again, dedup2 = c.publish_bytes("idem", epoch, cfg, data, FP, publish_id="step-1")
        assert (first.version, dedup1) == (1, False)
        assert (again.version, dedup2) == (1, True)
        assert c.list_versions("idem")[1] == 1
    assert not list(redis_proc.client().scan_iter("ll:staging:*"))


def test_new_publisher_fences_old_and_numbering_continues(broker):
    with BrokerClient(broker.target, TOKENS["learner"]) as c:
        old, _ = c.acquire_publisher("fence")
        c.publish_bytes("fence", old, *make_adapter(seed=1), FP)
        c.publish_bytes("fence", old, *make_adapter(seed=2), FP)
        new, latest = c.acquire_publisher("fence")  # a restarted learner
        assert new == old + 1 and latest == 2
        with pytest.raises(FailedPrecondition):
            c.publish_bytes("fence", old, *make_adapter(seed=3), FP)
        rec, _ = c.publish_bytes("fence", new, *make_adapter(seed=4), FP)
        assert rec.version == 3 and rec.publisher_epoch == new


def test_acknowledged_publish_survives_redis_sigkill(broker, redis_proc):
    with BrokerClient(broker.target, TOKENS["learner"]) as c:
        epoch, _ = c.acquire_publisher("durable")
        rec, _ = c.publish_bytes("durable", epoch, *make_adapter(seed=9), FP)
        redis_proc.kill()  # right after the acknowledgement
        redis_proc.start()
        got, data = c.fetch("durable@latest")
        assert got.version == rec.version == 1 and got.sha256 == rec.sha256
        assert hashlib.sha256(data).hexdigest() == rec.sha256


def test_fetch_unknown_version_is_not_found(broker):
    with BrokerClient(broker.target, TOKENS["client"]) as c, pytest.raises(NotFound):
        c.get("nothing@v3")


def test_fetch_to_file_writes_the_verified_bytes_and_removes_bad_ones(broker, redis_proc, tmp_path):
    with BrokerClient(broker.target, TOKENS["learner"]) as c:
        epoch, _ = c.acquire_publisher("tofile")
        rec, _ = c.publish_bytes("tofile", epoch, *make_adapter(seed=11), FP)
        out = tmp_path / "w.safetensors"
        got = c.fetch_to_file("tofile@v1", out)
        assert got == rec and out.read_bytes() == c.fetch("tofile@v1")[1]
        r = redis_proc.client()
        blob = r.get(f"ll:blob:{rec.sha256}")
        r.setrange(f"ll:blob:{rec.sha256}", len(blob) - 4, b"\x00\x01\x02\x03")  # bytes flipped at rest
        with pytest.raises(DataLoss):
            c.fetch_to_file("tofile@v1", out)
        assert not out.exists()
        with pytest.raises(NotFound):
            c.fetch_to_file("tofile@v7", out)
        assert not out.exists()


def test_what_a_publish_leaves_beyond_retention_is_bounded(broker_factory, redis_proc):
    """Issue 19 (load held): with keep_last 2, 3 events and 4 publish ids kept, 12 publishes leave
    exactly 2 versions + the pinned one, 3 stream entries, 4 publish ids and one key per family,
    whatever their number; a retried publish among the kept ids is still deduplicated, an older
    one is committed again (the ids past the newest 4 are forgotten)."""
    b = broker_factory("--registry.keep_last=2", "--registry.events_maxlen=3", "--registry.publish_ids_kept=4")
    r = redis_proc.client()
    with BrokerClient(b.target, TOKENS["learner"]) as c:
        epoch, _ = c.acquire_publisher("bounded")
        c.publish_bytes("bounded", epoch, *make_adapter(seed=100), FP, publish_id="id-1")
        c.pin("bounded@v1")
        for i in range(2, 13):
            c.publish_bytes("bounded", epoch, *make_adapter(seed=100 + i), FP, publish_id=f"id-{i}")
        records, latest = c.list_versions("bounded")
        assert latest == 12 and [x.version for x in records] == [1, 11, 12]
        assert r.xlen("ll:a:bounded:events") == 3
        assert [int(e[0].split(b"-")[0]) for e in r.xrange("ll:a:bounded:events")] == [10, 11, 12]
        assert r.zrange("ll:a:bounded:pubids", 0, -1) == [b"id-9", b"id-10", b"id-11", b"id-12"]
        assert 0 < r.ttl("ll:a:bounded:pubids") <= 86400
        assert sorted(k.decode() for k in r.scan_iter("ll:a:bounded*")) == [
            "ll:a:bounded", "ll:a:bounded:events", "ll:a:bounded:pinned", "ll:a:bounded:pubids",
            "ll:a:bounded:v:1", "ll:a:bounded:v:11", "ll:a:bounded:v:12", "ll:a:bounded:versions"]
        again, dedup = c.publish_bytes("bounded", epoch, *make_adapter(seed=112), FP, publish_id="id-12")
        assert (again.version, dedup) == (12, True)
        with pytest.raises(NotFound):  # id-10's version is kept in the ids but retired by retention
            c.publish_bytes("bounded", epoch, *make_adapter(seed=110), FP, publish_id="id-10")
        forgotten, dedup = c.publish_bytes("bounded", epoch, *make_adapter(seed=102), FP, publish_id="id-2")
        assert (forgotten.version, dedup) == (13, False)
