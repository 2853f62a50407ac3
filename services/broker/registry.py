"""AdapterRegistry: versioned, content-addressed LoRA adapters in Redis.

A publish streams bytes into a staging key (invisible, with a TTL) while they are hashed
and their safetensors header is checked against the adapter config; the commit is one Lua
script (fencing check, version assignment, record, event, retention), so concurrent
publishers can get neither the same number nor a gap, and a failed upload leaves nothing.

While an upload is under way, its bytes are also relayed to followers that asked for it
(`StagedRelay`: a STAGED watch event once the safetensors header has checked, then
`FetchStaged` streams the bytes as they arrive and, once the commit is durable, the committed
record). A rollout server loads them while Redis is still writing, and serves them only as the
version that record names: nothing is visible as a version before its commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.broker import scripts
from services.broker.config import RegistryConfig
from services.common.config import RedisConfig
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    LoraloopError,
    NotFound,
    RemoteError,
    ResourceExhausted,
    Unavailable,
)
from services.common.names import validate_name
from services.common.peft_format import (
    SafetensorsHeader,
    check_lora_adapter,
    parse_adapter_config,
    parse_safetensors_header,
)
from services.common.records import AdapterVersion

log = logging.getLogger(__name__)
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
WRITES_AHEAD = 8  # staging writes queued behind an upload's receive, at most
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 4096, 8 * 1024 * 1024  # a Fetch's chunk_bytes is held to these


def _stream_version(entry_id: str) -> int:
    """The version an event-stream entry id ("{version}-0") stands for."""
    return int(entry_id.split("-", 1)[0])


def _k(name: str, suffix: str = "") -> str:
    return f"ll:a:{name}{suffix}"


def redis_errors_unavailable(fn):
    """Report a lost Redis as UNAVAILABLE (callers retry) rather than an internal error."""

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except _REDIS_DOWN as e:
            raise Unavailable(f"redis unavailable: {e}") from e

    return wrapper


@dataclass(frozen=True)
class PublishIntent:
    """The header of a publish, as the client declared it."""

    name: str
    epoch: int
    base_model_fingerprint: str
    learner_step: int
    adapter_config_json: str
    size_bytes: int
    sha256: str
    publish_id: str = ""


class Staged:
    """An upload in progress as followers see it: its record (version 0), the bytes received so
    far, and how it ended (the committed record, or the error that ended it)."""

    def __init__(self, record: AdapterVersion) -> None:
        self.record = record
        self.parts: list[bytes] = []  # as received: relayed without a copy
        self.outcome: AdapterVersion | Exception | None = None
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def append(self, chunk: bytes) -> None:
        self.parts.append(chunk)
        self._notify()

    def end(self, outcome: AdapterVersion | Exception) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self._notify()

    async def stream(self) -> AsyncIterator[bytes | AdapterVersion]:
        """The bytes as they arrive (in the publisher's chunks), then the committed record;
        raises the upload's error."""
        sent = 0
        while True:
            changed = self._changed
            while sent < len(self.parts):
                sent += 1
                yield self.parts[sent - 1]
            if isinstance(self.outcome, Exception):  # a new one per reader, of the same status
                err = self.outcome
                cls = type(err) if isinstance(err, LoraloopError) and type(err) is not RemoteError else Unavailable
                raise cls(f"the upload did not commit: {err}")
            if self.outcome is not None:
                yield self.outcome
                return
            await changed.wait()


class StagedRelay:
    """Uploads in progress on this broker, by sha256, and the watches that want them. An
    upload that has ended stays fetchable for `grace_s` (its bytes and how it ended), so a
    follower that asks late -- its event loop busy, say -- still loads from the relay; at most
    `max_bytes` of ended uploads are kept, the oldest dropped first."""

    def __init__(self, max_bytes: int, grace_s: float = 10.0) -> None:
        self.max_bytes, self.grace_s = max_bytes, grace_s
        self.by_sha: dict[str, Staged] = {}
        self._ended: dict[str, Staged] = {}  # insertion order = the order they ended
        self._subs: set[tuple[frozenset[str], asyncio.Queue]] = set()

    def subscribe(self, names: frozenset[str], q: asyncio.Queue) -> tuple[frozenset[str], asyncio.Queue]:
        sub = (names, q)
        self._subs.add(sub)
        for st in self.by_sha.values():  # uploads already under way
            if st.record.name in names and st.outcome is None:
                q.put_nowait(("staged", st.record, True))
        return sub

    def unsubscribe(self, sub: tuple[frozenset[str], asyncio.Queue]) -> None:
        self._subs.discard(sub)

    def begin(self, record: AdapterVersion, received: bytes) -> Staged | None:
        """Stage an upload whose header has checked (None: too large, or the same bytes are
        being uploaded already)."""
        current = self.by_sha.get(record.sha256)
        if record.size_bytes > self.max_bytes or (current is not None and current.outcome is None):
            return None
        if current is not None:  # the same bytes again, after an upload of them ended
            self._drop(record.sha256)
        st = Staged(record)
        st.append(received)
        self.by_sha[record.sha256] = st
        for names, q in self._subs:
            if record.name in names:
                q.put_nowait(("staged", record, True))
        return st

    def finish(self, st: Staged, outcome: AdapterVersion | Exception) -> None:
        st.end(outcome)
        sha = st.record.sha256
        if self.by_sha.get(sha) is not st:
            return
        self._ended.pop(sha, None)
        self._ended[sha] = st
        while self._ended and sum(x.record.size_bytes for x in self._ended.values()) > self.max_bytes:
            self._drop(next(iter(self._ended)))
        if sha in self._ended:
            asyncio.get_running_loop().call_later(self.grace_s, self._drop, sha, st)

    def _drop(self, sha: str, st: Staged | None = None) -> None:
        ended = self._ended.get(sha)
        if ended is None or (st is not None and ended is not st):
            return
        del self._ended[sha]
        if self.by_sha.get(sha) is ended:
            del self.by_sha[sha]


class Upload:
    """One publish in progress: bytes go to a staging key, hashed and checked as they come."""

    def __init__(self, registry: AdapterRegistry, intent: PublishIntent, config: dict) -> None:
        self.registry, self.intent, self.config = registry, intent, config
        self.key = f"ll:staging:{uuid.uuid4().hex}"
        self.received = 0
        self._hash = hashlib.sha256()
        self._prefix = b""
        self.header: SafetensorsHeader | None = None
        self._done = False
        self.staged: Staged | None = None
        # Staging writes run behind the receive (at most WRITES_AHEAD chunks queued), so the
        # next chunk arrives while Redis writes and fsyncs the last; commit waits for them all.
        self._writes: asyncio.Queue[bytes | None] = asyncio.Queue(WRITES_AHEAD)
        self._writer: asyncio.Task[None] | None = None

    async def _write_staging(self) -> None:
        """Write the chunks in place into a staging string allocated at its full size first:
        APPEND grows the string by reallocating (and copying) it, which made Redis' share of a
        35 MB upload twice as long (190 ms against 90, measured)."""
        r = self.registry.redis
        offset, last = 0, False
        while not last:
            # Every chunk queued meanwhile goes in the same round trip: Redis fsyncs once per
            # batch of commands it reads, and one fsync per 1 MB chunk was 40 of the 90 ms a
            # 35 MB upload spent in Redis (measured against appendfsync no).
            batch = [await self._writes.get()]
            while not self._writes.empty():
                batch.append(self._writes.get_nowait())
            if batch[-1] is None:
                last = True
                batch.pop()
            if not batch:
                break
            async with r.pipeline(transaction=False) as p:
                if offset == 0:
                    p.setrange(self.key, self.intent.size_bytes - 1, b"\0")
                for chunk in batch:
                    p.setrange(self.key, offset, chunk)
                    offset += len(chunk)
                p.expire(self.key, self.registry.cfg.staging_ttl_s)
                await p.execute()

    async def _written(self) -> None:
        """Wait for every staging write; raises the first one's error."""
        if self._writer is None:
            return
        await self._enqueue(None)
        await self._writer

    async def _enqueue(self, item: bytes | None) -> None:
        """Queue `item` for the writer, or raise the writer's error if it ends first."""
        assert self._writer is not None
        if self._writer.done():
            await self._writer
            return
        put = asyncio.ensure_future(self._writes.put(item))
        await asyncio.wait([put, self._writer], return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            await self._writer  # it ended (an error) while the queue was full

    @redis_errors_unavailable
    async def append(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.received += len(chunk)
        if self.received > self.intent.size_bytes:
            raise InvalidArgument(f"upload is longer than the declared {self.intent.size_bytes} bytes")
        self._hash.update(chunk)
        if self.staged is not None:
            self.staged.append(chunk)
        if self.header is None:
            self._prefix += chunk
            self.header = parse_safetensors_header(self._prefix)
            if self.header is not None:
                self._stage(self._prefix)
                self._prefix = b""
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_staging())
        await self._enqueue(chunk)

    def _record(self, sha256: str) -> AdapterVersion:
        """The record of this upload (version 0); InvalidArgument if its header does not check."""
        assert self.header is not None
        i = self.intent
        spec = check_lora_adapter(self.config, self.header)
        return AdapterVersion(
            name=i.name, version=0, sha256=sha256, size_bytes=i.size_bytes,
            base_model_fingerprint=i.base_model_fingerprint, rank=spec.rank, alpha=spec.alpha,
            target_modules=spec.target_modules, learner_step=i.learner_step,
            adapter_config_json=i.adapter_config_json,
        )

    def _stage(self, received: bytes) -> None:
        """Relay this upload to followers once its header checks (best effort: one that does not
        check fails at commit, with its error, and is not relayed)."""
        relay = self.registry.relay
        if relay is None or self.header is None or self.header.expected_file_size != self.intent.size_bytes:
            return
        try:
            record = self._record(self.intent.sha256)
        except InvalidArgument:
            return
        self.staged = relay.begin(record, received)

    def end_staged(self, outcome: AdapterVersion | Exception) -> None:
        if self.staged is not None and self.registry.relay is not None:
            self.registry.relay.finish(self.staged, outcome)
            self.staged = None

    @redis_errors_unavailable
    async def commit(self) -> tuple[AdapterVersion, bool]:
        """Verify and commit; returns (record, deduplicated)."""
        i = self.intent
        await self._written()
        if self.received != i.size_bytes:
            raise InvalidArgument(f"truncated upload: received {self.received} of {i.size_bytes} bytes")
        digest = self._hash.hexdigest()
        if digest != i.sha256:
            raise InvalidArgument(f"sha256 mismatch: declared {i.sha256}, received bytes hash to {digest}")
        if self.header is None:
            raise InvalidArgument("upload does not hold a complete safetensors header")
        if self.header.expected_file_size != i.size_bytes:
            raise InvalidArgument(
                f"safetensors header describes {self.header.expected_file_size} bytes, upload has {i.size_bytes}"
            )
        record = self._record(digest)
        reg = self.registry
        res = await reg._commit(
            keys=[_k(i.name), _k(i.name, ":versions"), _k(i.name, ":events"), self.key,
                  f"ll:blob:{digest}", f"ll:blobref:{digest}", "ll:names", _k(i.name, ":pubids"),
                  _k(i.name, ":pinned")],
            args=[i.epoch, i.size_bytes, record.to_json(), i.name, _k(i.name, ":v:"), reg.cfg.keep_last,
                  i.publish_id, reg.cfg.events_maxlen, reg.cfg.publish_ids_kept, reg.cfg.publish_id_ttl_s],
        )
        self._done = True
        status = res[0].decode()
        if status == "STALE":
            raise FailedPrecondition(
                f"stale publisher epoch {i.epoch} for {i.name!r} (current {res[1].decode()}): "
                "another publisher took the lease"
            )
        if status == "SIZE":
            raise InvalidArgument(f"staged upload has {res[1].decode()} bytes, expected {i.size_bytes} (expired?)")
        if status == "DUP":
            if not res[1]:
                raise NotFound(f"publish {i.publish_id} committed v{res[2].decode()}, since retired")
            return AdapterVersion.from_json(res[1]), True
        await reg._wait_replicas()
        return AdapterVersion.from_json(res[1]), False

    async def abort(self) -> None:
        """Drop the staged bytes (the TTL covers a broker that dies before this runs).

        The writer is stopped, not cancelled: a staging write cancelled while Redis answers it
        could land after the DELETE below (leaving the key until its TTL), and a publish failed
        that way hung until its deadline (1 in ~20 uploads refused mid-way, found by sending a
        bad safetensors header one byte per chunk). Chunks still queued are dropped; the one
        batch in flight, if any, completes first."""
        if self._writer is not None:
            while not self._writes.empty():
                self._writes.get_nowait()
            self._writes.put_nowait(None)
            with contextlib.suppress(Exception):
                await self._writer
        if self._done:
            return
        self._done = True
        try:
            await self.registry.redis.delete(self.key)
        except _REDIS_DOWN:
            log.warning("could not delete %s; it expires in %ss", self.key, self.registry.cfg.staging_ttl_s)


class AdapterRegistry:
    def __init__(self, redis: aioredis.Redis, cfg: RegistryConfig, redis_cfg: RedisConfig | None = None) -> None:
        self.redis = redis
        self.cfg = cfg
        self.redis_cfg = redis_cfg or RedisConfig()
        self._commit = redis.register_script(scripts.COMMIT)
        self._acquire = redis.register_script(scripts.ACQUIRE)
        self._pin = redis.register_script(scripts.PIN)
        self._uploads = 0
        self.max_chunk_bytes = MAX_CHUNK_BYTES  # app.run lowers it to fit the server's message limit
        self.relay = StagedRelay(cfg.relay_max_bytes, cfg.relay_grace_s) if cfg.relay_max_bytes > 0 else None

    @classmethod
    def from_config(cls, redis_cfg: RedisConfig, cfg: RegistryConfig, password: str | None) -> AdapterRegistry:
        r = aioredis.Redis.from_url(redis_cfg.url, password=password or None,
                                    socket_connect_timeout=5, health_check_interval=10)
        return cls(r, cfg, redis_cfg)

    async def check_durability(self) -> str:
        """Verify Redis fsyncs every write, so an acknowledged publish survives a crash."""
        mode = self.redis_cfg.durability
        if mode == "off":
            return "durability check off"
        try:
            aof = (await self.redis.config_get("appendonly")).get("appendonly")
            fsync = (await self.redis.config_get("appendfsync")).get("appendfsync")
        except ResponseError as e:  # CONFIG may be forbidden by ACL
            msg = f"cannot read Redis persistence settings ({e})"
        else:
            if aof == "yes" and fsync == "always":
                return "redis durability: appendonly yes, appendfsync always"
            if self.redis_cfg.wait_replicas > 0:
                return f"redis durability: WAIT for {self.redis_cfg.wait_replicas} replica(s)"
            msg = f"Redis has appendonly={aof}, appendfsync={fsync}: an acknowledged publish could be lost"
        if mode == "require":
            raise SystemExit(msg + " (configure 'appendonly yes' + 'appendfsync always', or --redis.durability=warn)")
        log.warning(msg)
        return msg

    async def _wait_replicas(self) -> None:
        n = self.redis_cfg.wait_replicas
        if n > 0:
            got = await self.redis.wait(n, 5000)
            if got < n:
                log.warning("commit reached %d of %d replicas within 5 s", got, n)

    # ---------------------------------------------------------------- publisher side

    @redis_errors_unavailable
    async def acquire_publisher(self, name: str) -> tuple[int, int]:
        """New fencing epoch for `name`; returns (epoch, latest_version)."""
        validate_name(name)
        epoch, latest = await self._acquire(keys=[_k(name)])
        return int(epoch), int(latest)

    @redis_errors_unavailable
    async def begin_upload(self, intent: PublishIntent) -> Upload:
        validate_name(intent.name)
        if intent.size_bytes > self.cfg.max_adapter_bytes:
            raise ResourceExhausted(
                f"adapter of {intent.size_bytes} bytes exceeds the limit of {self.cfg.max_adapter_bytes}"
            )
        if intent.size_bytes < 8:
            raise InvalidArgument("declared size is too small for a safetensors file")
        if not _SHA_RE.fullmatch(intent.sha256):
            raise InvalidArgument("sha256 must be 64 lowercase hex characters")
        if not intent.base_model_fingerprint or len(intent.base_model_fingerprint) > 128:
            raise InvalidArgument("base_model_fingerprint is required (at most 128 characters)")
        if len(intent.publish_id) > 128:
            raise InvalidArgument("publish_id is at most 128 characters")
        config = parse_adapter_config(intent.adapter_config_json)
        current = await self.redis.hget(_k(intent.name), "epoch")
        if current is None or int(current) != intent.epoch:
            raise FailedPrecondition(
                f"stale publisher epoch {intent.epoch} for {intent.name!r} "
                f"(current {int(current or 0)}): acquire the publisher lease first"
            )
        if self._uploads >= self.cfg.max_concurrent_uploads:
            raise ResourceExhausted(f"{self._uploads} uploads in progress; retry later")
        return Upload(self, intent, config)

    async def publish(self, intent: PublishIntent, chunks: AsyncIterator[bytes]) -> tuple[AdapterVersion, bool]:
        """Stage, verify and commit; nothing is left behind when any step fails."""
        upload = await self.begin_upload(intent)
        self._uploads += 1
        outcome: AdapterVersion | Exception = Unavailable("the upload ended before its commit")
        try:
            t0 = time.perf_counter()
            t1 = None
            async for chunk in chunks:
                t1 = t1 or time.perf_counter()
                await upload.append(chunk)
            t2 = time.perf_counter()
            record, dedup = await upload.commit()
            t3 = time.perf_counter()
            log.debug("publish %s: first chunk after %.1f ms, the rest in %.1f ms, then writes + commit %.1f ms",
                      record.ref, 1e3 * ((t1 or t0) - t0), 1e3 * (t2 - (t1 or t0)), 1e3 * (t3 - t2))
            outcome = record
            return record, dedup
        except Exception as e:
            outcome = e
            raise
        finally:
            upload.end_staged(outcome)  # followers loading it learn how it ended
            self._uploads -= 1
            await asyncio.shield(upload.abort())

    # ---------------------------------------------------------------- read side

    async def _latest(self, name: str) -> int:
        return int(await self.redis.hget(_k(name), "latest") or 0)

    @redis_errors_unavailable
    async def get(self, name: str, version: int = 0) -> AdapterVersion:
        validate_name(name)
        v = version or await self._latest(name)
        if v == 0:
            raise NotFound(f"adapter {name!r} has no versions")
        async with self.redis.pipeline(transaction=False) as p:
            p.get(_k(name, f":v:{v}"))
            p.sismember(_k(name, ":pinned"), str(v))
            js, pinned = await p.execute()
        if js is None:
            latest = await self._latest(name)
            why = "never published" if v > latest else "retired by retention"
            raise NotFound(f"{name}@v{v} not found ({why}; latest is v{latest})")
        return AdapterVersion.from_json(js, bool(pinned))

    @redis_errors_unavailable
    async def list_versions(self, name: str) -> tuple[list[AdapterVersion], int]:
        validate_name(name)
        versions = await self.redis.zrange(_k(name, ":versions"), 0, -1)
        pinned = {int(v) for v in await self.redis.smembers(_k(name, ":pinned"))}
        return await self._records(name, versions, pinned), await self._latest(name)

    async def _records(self, name: str, versions: list, pinned: set[int] = frozenset()) -> list[AdapterVersion]:
        """The records of `versions` (members of the version set), in order; one retired in
        between is left out."""
        if not versions:
            return []
        out = []
        for v, js in zip(versions, await self.redis.mget([_k(name, f":v:{int(v)}") for v in versions]), strict=True):
            if js is not None:
                out.append(AdapterVersion.from_json(js, int(v) in pinned))
        return out

    @redis_errors_unavailable
    async def list_adapters(self) -> list[tuple[str, int, int, int]]:
        """(name, latest, live versions, epoch) per adapter name."""
        out = []
        for raw in sorted(await self.redis.smembers("ll:names")):
            name = raw.decode()
            meta = await self.redis.hgetall(_k(name))
            live = await self.redis.zcard(_k(name, ":versions"))
            out.append((name, int(meta.get(b"latest", 0)), live, int(meta.get(b"epoch", 0))))
        return out

    @redis_errors_unavailable
    async def read(self, record: AdapterVersion, chunk_bytes: int = 0) -> AsyncIterator[bytes]:
        """The adapter bytes of `record`, in chunks (a few reads pipelined per round trip). A
        requested chunk size is held to [4 KiB, max_chunk_bytes]: 1-byte chunks made a 256 MB
        fetch 256 M messages, and a chunk past the server's message limit failed the fetch
        (RESOURCE_EXHAUSTED)."""
        chunk = min(max(chunk_bytes, MIN_CHUNK_BYTES), self.max_chunk_bytes) if chunk_bytes else self.cfg.chunk_bytes
        key = f"ll:blob:{record.sha256}"
        if await self.redis.strlen(key) != record.size_bytes:
            raise NotFound(f"bytes of {record.ref} are gone (retired while being fetched?)")
        return self._read_blob(key, record.size_bytes, chunk)

    async def _read_blob(self, key: str, size: int, chunk: int) -> AsyncIterator[bytes]:
        offsets = list(range(0, size, chunk))
        for i in range(0, len(offsets), 4):
            try:
                async with self.redis.pipeline(transaction=False) as p:
                    for off in offsets[i : i + 4]:
                        p.getrange(key, off, min(off + chunk, size) - 1)
                    parts = await p.execute()
            except _REDIS_DOWN as e:
                raise Unavailable(f"redis unavailable during fetch: {e}") from e
            for part in parts:
                if not part:
                    raise NotFound("adapter bytes disappeared during fetch (retired?)")
                yield part

    def fetch_staged(self, sha256: str) -> tuple[AdapterVersion, AsyncIterator[bytes | AdapterVersion]]:
        """The record of the upload of `sha256` in progress here, and its stream (Staged.stream)."""
        st = self.relay.by_sha.get(sha256) if self.relay is not None else None
        if st is None:
            raise NotFound(f"no upload of sha256 {sha256[:12]}… is in progress on this broker")
        return st.record, st.stream()

    @redis_errors_unavailable
    async def set_pinned(self, name: str, version: int, pinned: bool) -> AdapterVersion | None:
        """Pin or unpin a live version; returns its record, or None if unpinning retired it."""
        validate_name(name)
        v = version or await self._latest(name)
        ok = await self._pin(keys=[_k(name, ":versions"), _k(name, ":pinned")],
                             args=[v, 1 if pinned else 0, _k(name, ":v:"), self.cfg.keep_last])
        if not ok:
            raise NotFound(f"{name}@v{v} is not a live version")
        try:
            return await self.get(name, v)
        except NotFound:
            return None

    # ---------------------------------------------------------------- watch

    async def watch(self, after: dict[str, int], block_ms: int = 2000,
                    include_staged: bool = False) -> AsyncIterator[tuple[str, AdapterVersion, bool]]:
        """Every version committed after `after[name]`, in order per name, then live ones; with
        `include_staged`, also the uploads of those names under way on this broker.

        Yields (kind, record, live), kind "published" or "staged"; `live` is False for versions
        that were already committed when the watch began. A lost Redis connection is retried for
        `redis.retry_s` seconds, so a Redis restart does not end the stream; the read resumes
        from the last id delivered.
        """
        if not include_staged or self.relay is None:
            async for rec, live in self._watch_committed(after, block_ms):
                yield "published", rec, live
            return
        q: asyncio.Queue = asyncio.Queue()  # names are checked by _watch_committed, in pump
        sub = self.relay.subscribe(frozenset(after), q)

        async def pump() -> None:
            try:
                async for rec, live in self._watch_committed(after, block_ms):
                    q.put_nowait(("published", rec, live))
            except Exception as e:
                q.put_nowait(e)

        task = asyncio.create_task(pump())
        try:
            while True:
                item = await q.get()
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.relay.unsubscribe(sub)
            task.cancel()

    async def _watch_committed(self, after: dict[str, int], block_ms: int) -> AsyncIterator[tuple[AdapterVersion, bool]]:
        for n in after:
            validate_name(n)
        names = {_k(n, ":events"): n for n in after}
        cursor = {_k(n, ":events"): f"{v}-0" for n, v in after.items()}
        latest_at_start = {}
        for n in after:
            latest_at_start[_k(n, ":events")] = await self._retrying(self._latest, n)
        while True:
            res = await self._retrying(self.redis.xread, cursor, count=256, block=block_ms)
            for stream, entries in res or []:
                stream = stream.decode() if isinstance(stream, bytes) else stream
                for entry_id, fields in entries:
                    entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    version, seen = _stream_version(entry_id), _stream_version(cursor[stream])
                    if version > seen + 1:  # the events between were trimmed (events_maxlen)
                        for rec in await self._retrying(self._live_between, names[stream], seen, version):
                            yield rec, rec.version > latest_at_start[stream]
                    rec = AdapterVersion.from_json(fields[b"record"])
                    cursor[stream] = entry_id
                    yield rec, rec.version > latest_at_start[stream]

    async def _live_between(self, name: str, low: int, high: int) -> list[AdapterVersion]:
        """The live versions strictly between `low` and `high` (pinned ones, or ones still kept), in
        order: what a watcher behind the event stream's trim is sent in place of those events."""
        return await self._records(name, await self.redis.zrangebyscore(_k(name, ":versions"), f"({low}", f"({high}"))

    async def _retrying(self, fn, *args, **kwargs):
        deadline = asyncio.get_running_loop().time() + self.redis_cfg.retry_s
        delay = 0.1
        while True:
            try:
                return await fn(*args, **kwargs)
            except _REDIS_DOWN as e:
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise Unavailable(f"redis unavailable for {self.redis_cfg.retry_s}s: {e}") from e
                log.warning("redis unavailable (%s); retrying in %.1fs", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def close(self) -> None:
        await self.redis.aclose()
