"""BrokerClient: the Python client of the adapter registry, used by rollout, learner,
tests and the `loraloop adapters` CLI.

Every call has a deadline; calls that are safe to repeat are retried with exponential
backoff on UNAVAILABLE. Publish is safe to repeat too: each carries a publish id and the
broker returns the version already committed for it instead of committing twice.

A call that fails raises the domain error of its status (`services.common.status.error_of`:
NOT_FOUND -> NotFound, DATA_LOSS -> DataLoss, ...), the reverse of the servers' mapping.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc

from loraloop.v1 import adapters_pb2 as pb
from loraloop.v1 import adapters_pb2_grpc as pb_grpc
from services.common.config import ClientTLSConfig
from services.common.errors import DataLoss
from services.common.names import AdapterSelector, parse_selector, validate_name
from services.common.peft_format import CONFIG_NAME, WEIGHTS_NAME
from services.common.records import AdapterVersion
from services.common.status import error_of

T = TypeVar("T")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
CHUNK = 1024 * 1024


def _sel(selector: str | AdapterSelector) -> AdapterSelector:
    return selector if isinstance(selector, AdapterSelector) else parse_selector(selector)


def _ref(selector: str | AdapterSelector) -> pb.AdapterRef:
    s = _sel(selector)
    return pb.AdapterRef(name=s.name, version=s.version)


class BrokerClient:
    # fetch() and fetch_to_file() hash the bytes as they arrive and raise DataLoss on a mismatch
    # with the record (the AdapterSource contract of services.rollout.adapters).
    verifies_sha256 = True

    def __init__(
        self,
        target: str,
        token: str | None = None,
        *,
        tls_ca_file: str | None = None,
        tls: ClientTLSConfig | None = None,
        timeout_s: float = 30.0,
        retries: int = 6,
        backoff_s: float = 0.2,
    ) -> None:
        self.target = target
        token = token if token is not None else os.environ.get("LORALOOP_TOKEN")
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        opts = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024)]
        if tls is None:
            tls = ClientTLSConfig(ca_file=tls_ca_file or None)
        elif tls_ca_file:
            tls = tls.model_copy(update={"ca_file": tls_ca_file})
        self.channel = tls.channel(target, opts)
        self.stub = pb_grpc.AdapterRegistryStub(self.channel)
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ plumbing

    def _call(self, fn: Callable[[], T]) -> T:
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                if code in RETRYABLE and attempt < self.retries:
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                raise error_of(code, e.details()) from None  # type: ignore[attr-defined]
        raise AssertionError("unreachable")

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the broker answers its health check."""
        from services.common.net import wait_healthy

        wait_healthy(self.target, timeout_s, channel=self.channel)

    # ------------------------------------------------------------ publisher side

    def acquire_publisher(self, name: str) -> tuple[int, int]:
        """Take the publisher lease for `name`: returns (epoch, latest_version)."""
        validate_name(name)
        r = self._call(lambda: self.stub.AcquirePublisher(
            pb.AcquirePublisherRequest(name=name), timeout=self.timeout_s, metadata=self._metadata))
        return r.epoch, r.latest_version

    def publish_bytes(
        self,
        name: str,
        epoch: int,
        adapter_config: dict | str,
        weights: bytes,
        base_model_fingerprint: str,
        learner_step: int = 0,
        publish_id: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[AdapterVersion, bool]:
        """Publish one adapter version; returns (record, deduplicated)."""
        config_json = adapter_config if isinstance(adapter_config, str) else json.dumps(adapter_config)
        header = pb.PublishHeader(
            name=name, epoch=epoch, base_model_fingerprint=base_model_fingerprint,
            learner_step=learner_step, adapter_config_json=config_json, size_bytes=len(weights),
            sha256=hashlib.sha256(weights).hexdigest(), publish_id=publish_id or uuid.uuid4().hex,
        )

        def requests() -> Iterator[pb.PublishRequest]:
            yield pb.PublishRequest(header=header)
            view = memoryview(weights)
            for off in range(0, len(weights), CHUNK):
                yield pb.PublishRequest(chunk=bytes(view[off : off + CHUNK]))
                if progress:
                    progress(min(CHUNK, len(weights) - off))

        timeout = self.timeout_s + len(weights) / 2e6
        r = self._call(lambda: self.stub.Publish(requests(), timeout=timeout, metadata=self._metadata))
        return AdapterVersion.from_pb(r.record), r.deduplicated

    def publish_dir(self, name: str, epoch: int, adapter_dir: str | Path, base_model_fingerprint: str,
                    learner_step: int = 0, **kw) -> tuple[AdapterVersion, bool]:
        """Publish a PEFT directory (adapter_config.json + adapter_model.safetensors)."""
        d = Path(adapter_dir)
        return self.publish_bytes(name, epoch, (d / CONFIG_NAME).read_text(), (d / WEIGHTS_NAME).read_bytes(),
                                  base_model_fingerprint, learner_step, **kw)

    # ------------------------------------------------------------ read side

    def get(self, selector: str | AdapterSelector) -> AdapterVersion:
        r = self._call(lambda: self.stub.GetAdapter(
            pb.GetAdapterRequest(ref=_ref(selector)), timeout=self.timeout_s, metadata=self._metadata))
        return AdapterVersion.from_pb(r)

    def list_versions(self, name: str) -> tuple[list[AdapterVersion], int]:
        r = self._call(lambda: self.stub.ListVersions(
            pb.ListVersionsRequest(name=name), timeout=self.timeout_s, metadata=self._metadata))
        return [AdapterVersion.from_pb(m) for m in r.records], r.latest_version

    def list_adapters(self) -> list[pb.AdapterSummary]:
        r = self._call(lambda: self.stub.ListAdapters(
            pb.ListAdaptersRequest(), timeout=self.timeout_s, metadata=self._metadata))
        return list(r.adapters)

    def _fetch_stream(self, selector: str | AdapterSelector, sink: Callable[[bytes], object],
                      restart: Callable[[], object],
                      progress: Callable[[int, int], None] | None) -> AdapterVersion:
        """Stream a version's bytes into `sink` (after `restart()`, once per attempt), hashing them
        as they arrive; DATA_LOSS if they end short or do not hash to the record's sha256."""

        def once() -> tuple[AdapterVersion, str]:
            restart()
            stream = self.stub.Fetch(pb.FetchRequest(ref=_ref(selector)), metadata=self._metadata,
                                     timeout=self.timeout_s + 300)
            record: AdapterVersion | None = None
            digest, size = hashlib.sha256(), 0
            for msg in stream:
                if msg.WhichOneof("part") == "record":
                    record = AdapterVersion.from_pb(msg.record)
                else:
                    sink(msg.chunk)
                    digest.update(msg.chunk)  # hash as it arrives: one pass over the bytes
                    size += len(msg.chunk)
                    if progress and record:
                        progress(len(msg.chunk), record.size_bytes)
            if record is None or size != record.size_bytes:
                raise DataLoss(f"{selector}: fetch ended after {size} bytes")
            return record, digest.hexdigest()

        record, digest = self._call(once)
        if digest != record.sha256:
            raise DataLoss(f"{record.ref}: sha256 {digest} != record {record.sha256}")
        return record

    def fetch(self, selector: str | AdapterSelector,
              progress: Callable[[int, int], None] | None = None) -> tuple[AdapterVersion, bytes]:
        """Fetch a version's record and safetensors bytes, verified against its sha256."""
        parts: list[bytes] = []
        record = self._fetch_stream(selector, parts.append, parts.clear, progress)
        return record, b"".join(parts)

    def fetch_to_file(self, selector: str | AdapterSelector, path: str | Path,
                      progress: Callable[[int, int], None] | None = None) -> AdapterVersion:
        """Fetch a version's safetensors bytes straight into `path` (written as they arrive, never
        held whole in memory), verified against its sha256; on any failure `path` is removed."""
        with open(path, "wb") as f:

            def restart() -> None:
                f.seek(0)
                f.truncate()

            try:
                return self._fetch_stream(selector, f.write, restart, progress)
            except BaseException:
                f.close()
                Path(path).unlink(missing_ok=True)
                raise

    def pull(self, selector: str | AdapterSelector, out_dir: str | Path,
             progress: Callable[[int, int], None] | None = None) -> AdapterVersion:
        """Write a version as a standard PEFT directory (atomically: all or nothing)."""
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            record = self.fetch_to_file(selector, tmp / WEIGHTS_NAME, progress)
            (tmp / CONFIG_NAME).write_text(record.adapter_config_json)
            (tmp / "loraloop_record.json").write_text(record.to_json())
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return record

    def fetch_staged(self, sha256: str, path: str | Path,
                     on_bytes: Callable[[AdapterVersion], object] | None = None) -> AdapterVersion:
        """Stream the bytes of an upload still in progress on the broker (a STAGED watch event's
        record) into `path` as they arrive, and return the version they were committed as.

        `on_bytes(staged_record)` runs once every byte is written and hashed to `sha256`, while
        the broker may still be committing. Not retried (best effort: the version's PUBLISHED
        event is the fallback). NotFound: no such upload in progress there; DataLoss: the bytes
        end short or hash to something else; the upload's own error if its commit failed. On
        any failure `path` is removed."""
        stream = self.stub.FetchStaged(pb.FetchStagedRequest(sha256=sha256), metadata=self._metadata,
                                       timeout=self.timeout_s + 300)
        staged: AdapterVersion | None = None
        digest, size = hashlib.sha256(), 0
        try:
            with open(path, "wb") as f:
                for msg in stream:
                    if msg.WhichOneof("part") == "chunk":
                        if staged is None or size + len(msg.chunk) > staged.size_bytes:
                            raise DataLoss("staged fetch sent more bytes than its record declares")
                        f.write(msg.chunk)
                        digest.update(msg.chunk)
                        size += len(msg.chunk)
                        if size == staged.size_bytes:
                            if digest.hexdigest() != sha256:
                                raise DataLoss(f"staged bytes hash to {digest.hexdigest()[:12]}…, not {sha256[:12]}…")
                            f.flush()
                            if on_bytes is not None:
                                on_bytes(staged)
                        continue
                    record = AdapterVersion.from_pb(msg.record)
                    if staged is None:
                        if record.sha256 != sha256:
                            raise DataLoss(f"asked for the upload of {sha256[:12]}…, got {record.sha256[:12]}…")
                        staged = record
                        continue
                    if size != staged.size_bytes:  # the committed record comes after every byte
                        raise DataLoss(f"staged upload ended after {size} of {staged.size_bytes} bytes")
                    if record.sha256 != sha256:
                        raise DataLoss(f"committed as {record.ref} with sha256 {record.sha256[:12]}…")
                    return record
            raise DataLoss("staged fetch ended without the committed record")
        except grpc.RpcError as e:
            Path(path).unlink(missing_ok=True)
            raise error_of(e.code(), e.details()) from None  # type: ignore[attr-defined]
        except BaseException:
            Path(path).unlink(missing_ok=True)
            stream.cancel()
            raise

    def pin(self, selector: str | AdapterSelector) -> AdapterVersion:
        r = self._call(lambda: self.stub.Pin(pb.PinRequest(ref=_ref(selector)), timeout=self.timeout_s,
                                             metadata=self._metadata))
        return AdapterVersion.from_pb(r.record)

    def unpin(self, selector: str | AdapterSelector) -> AdapterVersion:
        r = self._call(lambda: self.stub.Unpin(pb.PinRequest(ref=_ref(selector)), timeout=self.timeout_s,
                                               metadata=self._metadata))
        return AdapterVersion.from_pb(r.record)

    def watch(self, after: dict[str, int], window_s: float = 600.0,
              on_staged: Callable[[AdapterVersion], object] | None = None) -> WatchStream:
        """Every version after `after[name]`, in order, each once, reconnecting as needed. With
        `on_staged`, the broker also announces uploads of those names as they begin, and each
        one's record (version 0) is passed to `on_staged` from the iterating thread (it must not
        block: the PUBLISHED events wait behind it); see fetch_staged."""
        return WatchStream(self, after, window_s, on_staged)


class WatchStream:
    """Iterator over (record, live). Survives broker and Redis restarts: it reopens the
    stream from the last version it delivered, so nothing is missed or repeated. Each
    stream has a deadline (`window_s`) and is reopened when it passes."""

    def __init__(self, client: BrokerClient, after: dict[str, int], window_s: float,
                 on_staged: Callable[[AdapterVersion], object] | None = None) -> None:
        for n in after:
            validate_name(n)
        self.client, self.last, self.window_s = client, dict(after), window_s
        self.on_staged = on_staged
        self._call: grpc.Future | None = None
        self._closed = threading.Event()
        self.reconnects = 0

    def close(self) -> None:
        self._closed.set()
        if self._call is not None:
            self._call.cancel()

    def __iter__(self) -> Iterator[tuple[AdapterVersion, bool]]:
        delay = self.client.backoff_s
        while not self._closed.is_set():
            req = pb.WatchRequest(adapters=[pb.WatchFrom(name=n, after_version=v) for n, v in self.last.items()],
                                  include_staged=self.on_staged is not None)
            self._call = self.client.stub.Watch(req, timeout=self.window_s, metadata=self.client._metadata)
            try:
                for ev in self._call:
                    rec = AdapterVersion.from_pb(ev.record)
                    if ev.kind == pb.AdapterEvent.STAGED:
                        if self.on_staged is not None:
                            self.on_staged(rec)
                        continue
                    if rec.version <= self.last.get(rec.name, 0):
                        continue
                    self.last[rec.name] = rec.version
                    delay = self.client.backoff_s
                    yield rec, ev.live
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                if self._closed.is_set() or code == grpc.StatusCode.CANCELLED:
                    return
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise error_of(code, e.details()) from None  # type: ignore[attr-defined]
                self.reconnects += 1
                if self._closed.wait(delay if code == grpc.StatusCode.UNAVAILABLE else 0):
                    return
                delay = min(delay * 2, 2.0)
