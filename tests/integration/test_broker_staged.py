"""Staged relay: a follower gets an upload's bytes while the broker is still receiving and
committing them, and learns the version they became (or the error that ended the upload).
Real redis-server and broker; the upload is driven chunk by chunk on the raw stub so the test
decides when each part arrives."""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest

from loraloop.v1 import adapters_pb2 as pb
from loraloop.v1 import adapters_pb2_grpc as pb_grpc
from services.broker.client import BrokerClient
from services.common.errors import DataLoss, FailedPrecondition, NotFound, PermissionDenied
from tests.support.adapters import make_adapter
from tests.support.procs import TOKENS

FP = "sha256:" + "ef" * 32


class GatedUpload:
    """A Publish call whose chunks are released one `step()` at a time."""

    def __init__(self, target: str, name: str, epoch: int, data: bytes, config: dict, parts: list[bytes],
                 sha256: str | None = None) -> None:
        self.gate: queue.Queue = queue.Queue()
        self.channel = grpc.insecure_channel(target)
        stub = pb_grpc.AdapterRegistryStub(self.channel)
        header = pb.PublishHeader(name=name, epoch=epoch, base_model_fingerprint=FP, learner_step=7,
                                  adapter_config_json=json.dumps(config), size_bytes=len(data),
                                  sha256=sha256 or hashlib.sha256(data).hexdigest(), publish_id=uuid.uuid4().hex)

        def requests():
            yield pb.PublishRequest(header=header)
            for p in parts:
                self.gate.get()
                yield pb.PublishRequest(chunk=p)

        self.future = stub.Publish.future(requests(), timeout=60,
                                          metadata=[("authorization", f"Bearer {TOKENS['learner']}")])

    def step(self) -> None:
        self.gate.put(None)

    def result(self) -> pb.PublishResponse:
        try:
            return self.future.result()
        finally:
            self.channel.close()


def _staged_watch(target: str, name: str):
    """A watch with on_staged; returns (client, stream, staged records queue, published queue)."""
    client = BrokerClient(target, TOKENS["rollout"], backoff_s=0.05)
    staged: queue.Queue = queue.Queue()
    published: queue.Queue = queue.Queue()
    stream = client.watch({name: 0}, on_staged=staged.put)

    def run() -> None:
        for rec, _live in stream:
            published.put(rec)

    threading.Thread(target=run, daemon=True).start()
    return client, stream, staged, published


def _split(data: bytes) -> list[bytes]:
    head = 8 + int.from_bytes(data[:8], "little")  # the safetensors header, whole, in part one
    return [data[: head + 16], data[head + 16 : len(data) // 2], data[len(data) // 2 :]]


def test_follower_gets_the_bytes_before_the_commit_then_the_version(broker, tmp_path: Path):
    with BrokerClient(broker.target, TOKENS["learner"]) as c:
        epoch, _ = c.acquire_publisher("st")
    config, data = make_adapter(seed=3, min_bytes=200_000)
    client, stream, staged, published = _staged_watch(broker.target, "st")
    up = GatedUpload(broker.target, "st", epoch, data, config, _split(data))
    try:
        up.step()  # the header's part: the upload is announced, before most bytes exist
        rec = staged.get(timeout=20)
        assert (rec.name, rec.version, rec.sha256, rec.size_bytes) == ("st", 0, hashlib.sha256(data).hexdigest(), len(data))
        assert rec.learner_step == 7 and rec.rank == 4

        got_bytes = threading.Event()
        out: dict = {}

        def fetch() -> None:
            try:
                out["record"] = client.fetch_staged(rec.sha256, tmp_path / "w.safetensors",
                                                    on_bytes=lambda r: got_bytes.set())
            except Exception as e:  # reported below
                out["error"] = e

        t = threading.Thread(target=fetch)
        t.start()
        assert not got_bytes.wait(0.5), "on_bytes before every byte was uploaded"
        up.step()
        up.step()  # the last part
        assert got_bytes.wait(20)
        t.join(20)
        resp = up.result()
        assert "error" not in out, out.get("error")
        assert out["record"].version == resp.record.version == 1
        assert out["record"].sha256 == rec.sha256
        assert (tmp_path / "w.safetensors").read_bytes() == data
        assert published.get(timeout=20).version == 1  # the PUBLISHED event still comes
        assert published.empty() and staged.empty()
    finally:
        stream.close()
        client.close()


@pytest.mark.parametrize("how", ["stale-epoch", "wrong-sha256"])
def test_an_upload_that_does_not_commit_fails_the_staged_fetch(broker, tmp_path: Path, how: str):
    """stale-epoch: every byte arrives and checks (on_bytes runs: a rollout server would have
    loaded them), then another publisher takes the name and the commit is refused: the fetch
    ends with that error and no version. wrong-sha256: the follower's own hash check refuses."""
    learner = BrokerClient(broker.target, TOKENS["learner"])
    epoch, _ = learner.acquire_publisher("bad")
    config, data = make_adapter(seed=4, min_bytes=100_000)
    sha = hashlib.sha256(data).hexdigest() if how == "stale-epoch" else hashlib.sha256(b"other").hexdigest()
    client, stream, staged, published = _staged_watch(broker.target, "bad")
    up = GatedUpload(broker.target, "bad", epoch, data, config, _split(data), sha256=sha)
    try:
        up.step()
        assert staged.get(timeout=20).sha256 == sha
        got_bytes = threading.Event()
        out: dict = {}

        def fetch() -> None:
            try:
                out["record"] = client.fetch_staged(sha, tmp_path / "w.safetensors", on_bytes=lambda r: got_bytes.set())
            except Exception as e:  # asserted below
                out["error"] = e

        t = threading.Thread(target=fetch)
        t.start()
        up.step()
        if how == "stale-epoch":
            learner.acquire_publisher("bad")  # a new publisher fences this upload out
        up.step()
        with pytest.raises(grpc.RpcError) as e:
            up.result()
        expected = {"stale-epoch": grpc.StatusCode.FAILED_PRECONDITION, "wrong-sha256": grpc.StatusCode.INVALID_ARGUMENT}
        assert e.value.code() == expected[how]
        t.join(20)
        assert "record" not in out
        if how == "stale-epoch":
            assert got_bytes.is_set()
            assert isinstance(out["error"], FailedPrecondition) and "did not commit" in str(out["error"])
        else:
            assert not got_bytes.is_set()
            assert isinstance(out["error"], DataLoss)
        assert not (tmp_path / "w.safetensors").exists()
        assert published.empty()
    finally:
        stream.close()
        client.close()
        learner.close()


def test_staged_fetch_needs_the_rollout_role_and_an_upload_in_progress(broker, tmp_path: Path):
    with BrokerClient(broker.target, TOKENS["rollout"]) as c, pytest.raises(NotFound):
        c.fetch_staged("ab" * 32, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with BrokerClient(broker.target, TOKENS["client"]) as c, pytest.raises(PermissionDenied):
        c.fetch_staged("ab" * 32, tmp_path / "x")


def test_relay_off_announces_nothing_and_publish_is_unchanged(broker_factory):
    b = broker_factory("--registry.relay_max_bytes=0")
    with BrokerClient(b.target, TOKENS["learner"]) as c:
        epoch, _ = c.acquire_publisher("off")
    client, stream, staged, published = _staged_watch(b.target, "off")
    try:
        with BrokerClient(b.target, TOKENS["learner"]) as c:
            rec, _ = c.publish_bytes("off", epoch, *make_adapter(seed=5), FP)
        assert published.get(timeout=20).version == rec.version == 1
        assert staged.empty()
    finally:
        stream.close()
        client.close()


def test_a_late_follower_still_gets_an_ended_upload_for_the_grace_period(broker_factory, tmp_path: Path):
    """A follower whose STAGED event was handled late (its loop busy) asks after the commit:
    within relay_grace_s it still gets the bytes and the committed record; after it, NotFound
    (and it loads from the PUBLISHED event as usual)."""
    b = broker_factory("--registry.relay_grace_s=1.5")
    with BrokerClient(b.target, TOKENS["learner"]) as c:
        epoch, _ = c.acquire_publisher("late")
        config, data = make_adapter(seed=6)
        rec, _ = c.publish_bytes("late", epoch, config, data, FP)
    sha = hashlib.sha256(data).hexdigest()
    with BrokerClient(b.target, TOKENS["rollout"]) as r:
        got = r.fetch_staged(sha, tmp_path / "w")
        assert got.version == rec.version == 1 and (tmp_path / "w").read_bytes() == data
        time.sleep(2.0)
        with pytest.raises(NotFound):
            r.fetch_staged(sha, tmp_path / "w2")
