"""AdapterManager: which adapter versions a rollout server holds, and which one serves a request.

- `name`/`name@latest` resolves at admission to the newest version *loaded into the engine*
  (`latest` moves only after a new version has loaded); `name@vN` pins a version.
- A request holds its version (`active` count) until it ends; an old version is unloaded
  only once no request holds it, and is fetched again if a later request pins it.
- An adapter for another base, above `max_lora_rank`, for modules the model lacks, or with
  bytes that do not hash to their record is refused with a clear error; serving goes on.
- Following: the manager owns which names it follows (`follow`, or the first request for
  `name@latest`). It loads the newest version, then asks its watcher to announce the later
  ones, which arrive through `on_published`; `wait_for` waits on its change event.
- Staged loads: for a followed name, `on_staged` (an upload just begun on the broker) fetches
  the bytes as they are uploaded and loads them into the engine under a name no request can
  ask for; once the broker says the commit is durable it becomes that version (and `latest`),
  with no second fetch or load. An upload that fails drops it; `on_published` of the version
  joins it, and loads the usual way if it failed.

The engine, the broker and the watcher are injected (`LoraEngine`, `AdapterSource`,
`AdapterWatcher`), so this logic is unit-tested with fakes and integration-tested with vLLM
and a real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from services.common import events, scratch
from services.common.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from services.common.fingerprint import (
    model_fingerprint,
    read_safetensors_header,
    read_safetensors_prefix,
)
from services.common.names import AdapterSelector, parse_selector
from services.common.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_lora_adapter,
    parse_adapter_config,
    parse_safetensors_header,
)
from services.common.records import AdapterVersion
from services.rollout.engine import LoraHandle

log = logging.getLogger(__name__)
_PEFT_PREFIX = "base_model.model."
# The event logged for every version loaded into the engine (services.common.events), with its
# timings: what the hot-load bench and the e2e tests read.
ADAPTER_LOADED = "adapter_loaded"


class AdapterRefused(FailedPrecondition):
    """This server will not serve that adapter version (base, rank, modules or bytes)."""


class LoraEngine(Protocol):
    async def add_lora(self, lora: LoraHandle) -> None: ...
    async def remove_lora(self, lora: LoraHandle) -> None: ...


class AdapterSource(Protocol):
    """The broker, as the manager needs it (BrokerClient fits; called from a thread). Both
    raise NotFound for an unknown version; fetch_to_file raises DataLoss (and leaves no file)
    for bytes that end short or, where verifies_sha256, do not hash to the record."""

    # True: fetch_to_file checks the bytes against record.sha256 as they arrive (BrokerClient
    # does), so the manager does not hash them a second time.
    verifies_sha256: bool

    def get(self, selector: str) -> AdapterVersion: ...

    def fetch_to_file(self, selector: str, path: Path) -> AdapterVersion:
        """Write the version's safetensors bytes to `path` as they arrive (the cache write
        overlaps the transfer); returns its record."""
        ...

    # Optional (staged loads): BrokerClient.fetch_staged -- the bytes of an upload in progress
    # into `path`, `on_bytes(record)` once all are there and verified, then the committed record.


class AdapterObserver(Protocol):
    """Told of every load (with its seconds; `swap`: the version had been evicted before) and
    every eviction (the rollout's Prometheus metrics)."""

    def adapter_loaded(self, name: str, seconds: float, swap: bool) -> None: ...
    def adapter_evicted(self, name: str) -> None: ...


class AdapterWatcher(Protocol):
    """Announces the versions of a name after `after` to the manager's `on_published`, in
    order (the Follower, over the broker's Watch stream)."""

    def watch(self, name: str, after: int) -> None: ...


@dataclass(frozen=True)
class BaseModel:
    """What adapters are checked against."""

    fingerprint: str
    weight_names: frozenset[str]
    max_lora_rank: int

    @classmethod
    def from_dir(cls, model_dir: str | Path, max_lora_rank: int) -> BaseModel:
        names: set[str] = set()
        for f in sorted(Path(model_dir).glob("*.safetensors")):
            names |= set(read_safetensors_header(f).tensors)
        return cls(model_fingerprint(model_dir), frozenset(names), max_lora_rank)


def check_adapter(record: AdapterVersion, data: bytes, base: BaseModel, sha256_verified: bool = False,
                  size: int | None = None) -> None:
    """Raise AdapterRefused unless this server can serve `record` with bytes `data`
    (`sha256_verified`: the source already matched the bytes to record.sha256). With `size`,
    `data` is only the head of the bytes (their safetensors header) and `size` their length,
    which needs sha256_verified: the rest is not here to hash."""
    where = record.ref
    if size is not None and not sha256_verified:
        raise ValueError("check_adapter: a head of the bytes can only be checked once they are verified")
    if record.base_model_fingerprint != base.fingerprint:
        raise AdapterRefused(f"{where} was trained on base {record.base_model_fingerprint[:23]}…, "
                             f"this server serves {base.fingerprint[:23]}…")
    if record.rank > base.max_lora_rank:
        raise AdapterRefused(f"{where} has rank {record.rank} > max_lora_rank {base.max_lora_rank}")
    digest = record.sha256 if sha256_verified else hashlib.sha256(data).hexdigest()
    if digest != record.sha256 or (len(data) if size is None else size) != record.size_bytes:
        raise AdapterRefused(f"{where}: bytes are corrupt (sha256 {digest[:12]}…, record {record.sha256[:12]}…)")
    try:
        header = parse_safetensors_header(data)
        if header is None:
            raise InvalidArgument("truncated safetensors header")
        spec = check_lora_adapter(parse_adapter_config(record.adapter_config_json), header)
    except InvalidArgument as e:
        raise AdapterRefused(f"{where}: not a valid LoRA adapter: {e}") from None
    if spec.rank > base.max_lora_rank:
        raise AdapterRefused(f"{where} has rank {spec.rank} > max_lora_rank {base.max_lora_rank}")
    missing = [m for m in spec.module_paths
               if f"{m.removeprefix(_PEFT_PREFIX)}.weight" not in base.weight_names]
    if missing:
        raise AdapterRefused(f"{where} targets modules the base model lacks: {', '.join(missing[:4])}"
                             + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""))


@dataclass
class LoadedVersion:
    record: AdapterVersion
    handle: LoraHandle
    active: int = 0
    last_used: float = 0.0  # monotonic; the LRU order for eviction


CACHE_PREFIX = "loraloop-adapters-"


def default_cache_dir() -> Path:
    """A new cache dir in RAM where there is /dev/shm; those of rollout servers that died
    (SIGKILL, OOM) are removed first, so replaced replicas do not pile adapters up in RAM."""
    return scratch.claim(scratch.ram_or_temp(), CACHE_PREFIX)


class AdapterManager:
    def __init__(self, engine: LoraEngine, source: AdapterSource, base: BaseModel, cache_dir: Path,
                 watcher: AdapterWatcher | None = None, capacity: int | None = None,
                 observer: AdapterObserver | None = None) -> None:
        self.engine, self.source, self.base, self.watcher = engine, source, base, watcher
        # Versions kept loaded at most (the engine's max_cpu_loras): past it the least recently
        # used idle version is evicted, and fetched again from the broker when next asked for.
        self.capacity, self.observer = capacity, observer
        self.evicted: set[tuple[str, int]] = set()
        self.cache_dir = cache_dir
        self.loaded: dict[tuple[str, int], LoadedVersion] = {}
        self.latest: dict[str, int] = {}
        self.refused: dict[tuple[str, int], str] = {}
        self._loading: dict[tuple[str, int], asyncio.Future[LoadedVersion]] = {}
        self._staged: dict[str, asyncio.Task[None]] = {}  # sha256 -> its staged load
        self._next_id = 1
        self.followed: set[str] = set()  # names whose new versions the watcher announces
        self.loads = 0  # versions loaded into the engine since start (for metrics/tests)
        # Set (and replaced by a fresh one) whenever loaded, refused or latest change: what
        # WatchAdapters waits on. Created lazily, on the event loop that first asks for it.
        self._changed: asyncio.Event | None = None

    # ------------------------------------------------------------ change notification

    def changed(self) -> asyncio.Event:
        """An event set at the next change of loaded, refused or latest (take it before reading
        the state, then wait on it: a change in between is not missed)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    # ------------------------------------------------------------ loading

    async def _fetch_to(self, selector: str, path: Path) -> AdapterVersion:
        try:
            return await asyncio.to_thread(self.source.fetch_to_file, selector, path)
        except DataLoss as e:  # not remembered as refused: a later fetch may get good bytes
            log.error("refused %s: fetched bytes are corrupt (%s)", selector, e)
            raise AdapterRefused(f"{selector}: bytes are corrupt ({e})") from None

    async def load(self, record: AdapterVersion) -> LoadedVersion:
        """Fetch, verify, write to the local cache and load into the engine (once per version)."""
        return await self._load(record.name, record.version)

    async def _load(self, name: str, version: int) -> LoadedVersion:
        t0 = time.perf_counter()
        key = (name, version)
        if key in self.loaded:
            return self.loaded[key]
        if key in self.refused:
            raise AdapterRefused(self.refused[key])
        if key in self._loading:  # join the load under way instead of fetching it again
            return await asyncio.shield(self._loading[key])
        fut: asyncio.Future[LoadedVersion] = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.cache_dir))
        try:
            # Straight into the cache: the write overlaps the transfer.
            record = await self._fetch_to(f"{name}@v{version}", tmp / WEIGHTS_NAME)
            lv = await self._load_fetched(record, tmp, fetch_s=time.perf_counter() - t0)
            fut.set_result(lv)
            return lv
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._loading[key]
            shutil.rmtree(tmp, ignore_errors=True)  # moved into the cache unless it failed

    async def _load_fetched(self, record: AdapterVersion, fetched_to: Path, fetch_s: float) -> LoadedVersion:
        """Check, cache and load a version whose bytes are in `fetched_to`/adapter_model.safetensors."""
        key = (record.name, record.version)
        t0 = time.perf_counter()
        lora_id = self._next_id
        self._next_id += 1
        try:
            # In a thread: checking and writing tens of MB must not stall the requests being
            # streamed from this event loop meanwhile.
            path = await asyncio.to_thread(self._check_and_cache, record, fetched_to, lora_id)
        except AdapterRefused as e:
            self.refused[key] = str(e)
            self._notify()
            log.error("refused adapter: %s", e)
            raise
        handle = LoraHandle(record.ref, lora_id, str(path))
        t1 = time.perf_counter()
        try:
            await self.engine.add_lora(handle)
        except RuntimeError as e:
            shutil.rmtree(path, ignore_errors=True)
            self.refused[key] = str(e)
            self._notify()
            log.error("refused adapter %s: %s", record.ref, e)
            raise AdapterRefused(str(e)) from None
        t2 = time.perf_counter()
        return await self._install(record, handle, fetch_s + t2 - t0, fetch_ms=fetch_s * 1e3,
                                   check_cache_ms=(t1 - t0) * 1e3, engine_ms=(t2 - t1) * 1e3)

    async def _install(self, record: AdapterVersion, handle: LoraHandle, load_s: float,
                       **timings: Any) -> LoadedVersion:
        """Serve `handle` (in the engine already) as `record`'s version: its load event (with
        `timings`; floats are ms, rounded) and metric, then eviction beyond capacity."""
        key = (record.name, record.version)
        lv = LoadedVersion(record, handle, last_used=time.monotonic())
        self.loaded[key] = lv
        self.loads += 1
        self._notify()
        events.emit(log, ADAPTER_LOADED, adapter=record.ref, name=record.name, version=record.version,
                    lora_id=handle.lora_id, size_bytes=record.size_bytes,
                    **{k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()})
        if self.observer is not None:
            self.observer.adapter_loaded(record.name, load_s, swap=key in self.evicted)
        self.evicted.discard(key)
        await self._evict_beyond_capacity(keep=key)
        return lv

    async def _discard(self, handle: LoraHandle) -> None:
        """Take a load no version uses out of the engine and the cache."""
        with contextlib.suppress(Exception):
            await self.engine.remove_lora(handle)
        shutil.rmtree(handle.path, ignore_errors=True)

    def _check_and_cache(self, record: AdapterVersion, fetched_to: Path, lora_id: int) -> Path:
        """Check the fetched bytes and move them to the cache directory of this load. Each load
        has a directory of its own (`v{version}.{lora_id}`): a version unloaded while a request
        that pins it loads it again must not delete the new load's files."""
        weights = fetched_to / WEIGHTS_NAME
        if self.source.verifies_sha256:  # hashed on the way in: its header is what is left to check
            check_adapter(record, read_safetensors_prefix(weights), self.base, sha256_verified=True,
                          size=weights.stat().st_size)
        else:
            check_adapter(record, weights.read_bytes(), self.base)
        path = self.cache_dir / record.name / f"v{record.version}.{lora_id}"
        (fetched_to / CONFIG_NAME).write_text(json.dumps(json.loads(record.adapter_config_json)))
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(fetched_to, path)
        return path

    async def on_published(self, record: AdapterVersion) -> None:
        """A version announced by the broker: load it, then move `latest` to it."""
        staged = self._staged.get(record.sha256)
        if staged is not None and (record.name, record.version) not in self.loaded:
            await asyncio.wait([staged])  # its load becomes this version, or it failed: load anew
        try:
            await self.load(record)
        except (AdapterRefused, NotFound) as e:
            log.warning("not serving %s: %s", record.ref, e)
            return
        await self._make_latest(record)

    async def _make_latest(self, record: AdapterVersion) -> None:
        if record.version > self.latest.get(record.name, 0):
            self.latest[record.name] = record.version
            self._notify()
            log.info("%s@latest is now v%d", record.name, record.version)
        await self._unload_drained(record.name)

    # ------------------------------------------------------------ staged loads

    def on_staged(self, staged: AdapterVersion) -> None:
        """An upload of a followed name has begun on the broker (called on the event loop):
        start loading its bytes as they arrive. Best effort: any failure only logs, and the
        version loads from its PUBLISHED event as it would have."""
        fetch_staged = getattr(self.source, "fetch_staged", None)
        if (fetch_staged is None or staged.name not in self.followed or staged.sha256 in self._staged
                or staged.base_model_fingerprint != self.base.fingerprint or staged.rank > self.base.max_lora_rank):
            return
        task = asyncio.get_running_loop().create_task(self._load_staged(staged, fetch_staged))
        self._staged[staged.sha256] = task

        def done(t: asyncio.Task) -> None:
            if self._staged.get(staged.sha256) is t:
                del self._staged[staged.sha256]

        task.add_done_callback(done)

    async def _load_staged(self, staged: AdapterVersion, fetch_staged) -> None:
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        bytes_in: asyncio.Future[float] = loop.create_future()

        def on_bytes(_record: AdapterVersion) -> None:  # on the fetching thread
            loop.call_soon_threadsafe(lambda: bytes_in.done() or bytes_in.set_result(time.perf_counter()))

        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.cache_dir))
        fetch = asyncio.ensure_future(asyncio.to_thread(fetch_staged, staged.sha256, tmp / WEIGHTS_NAME, on_bytes))
        handle: LoraHandle | None = None
        try:
            await asyncio.wait([fetch, bytes_in], return_when=asyncio.FIRST_COMPLETED)
            if not bytes_in.done():
                await fetch  # raises how the fetch ended
                raise DataLoss("staged fetch ended before its bytes")
            t1 = bytes_in.result()
            lora_id = self._next_id
            self._next_id += 1
            path = await asyncio.to_thread(self._check_and_cache, staged, tmp, lora_id)
            t2 = time.perf_counter()
            handle = LoraHandle(f"{staged.name}@staged.{lora_id}", lora_id, str(path))
            await self.engine.add_lora(handle)
            t3 = time.perf_counter()
            record: AdapterVersion = await fetch  # the commit, made durable
            t4 = time.perf_counter()
        except Exception as e:
            fetch.cancel()
            log.info("staged load of %s (%s…) dropped: %s", staged.name, staged.sha256[:12], e)
            if handle is not None:
                await self._discard(handle)
            return
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # moved into the cache unless it failed
        key = (record.name, record.version)
        if key in self.loaded or key in self._loading or key in self.refused:  # loaded another way meanwhile
            await self._discard(handle)
            return
        await self._install(record, LoraHandle(record.ref, lora_id, handle.path), t3 - t0,
                            fetch_ms=(t1 - t0) * 1e3, check_cache_ms=(t2 - t1) * 1e3,
                            engine_ms=(t3 - t2) * 1e3, staged=True, commit_wait_ms=(t4 - t3) * 1e3)
        await self._make_latest(record)

    # ------------------------------------------------------------ following

    async def follow(self, name: str) -> None:
        """Load the newest version of `name` (if it has one yet), then have the watcher
        announce every later one. Once per name."""
        if name in self.followed:
            return
        with contextlib.suppress(NotFound):
            await self._load_latest(name)
        self._start_following(name)

    async def _load_latest(self, name: str) -> None:
        await self.on_published(await asyncio.to_thread(self.source.get, f"{name}@latest"))

    def _start_following(self, name: str) -> None:
        if name not in self.followed:
            self.followed.add(name)
            if self.watcher is not None:
                self.watcher.watch(name, self.latest.get(name, 0))

    async def wait_for(self, name: str, min_version: int, deadline: float) -> None:
        """Follow `name` and return once its latest loaded version is >= `min_version`;
        TimeoutError at `deadline` (unix seconds)."""
        if name not in self.followed:
            await self.follow(name)
        while self.latest.get(name, 0) < min_version:
            changed = self.changed()
            if self.latest.get(name, 0) >= min_version:
                return
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError(f"{name}@v{min_version} did not arrive before the deadline")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)

    # ------------------------------------------------------------ admission

    async def resolve(self, sel: AdapterSelector) -> LoadedVersion:
        if sel.is_latest:
            if sel.name not in self.followed:  # first use: ask the broker, follow from then on
                await self._load_latest(sel.name)  # NotFound: an unknown name is not followed
                self._start_following(sel.name)
            v = self.latest.get(sel.name)
            if v is None:
                raise AdapterRefused(self.refused.get((sel.name, self._max_refused(sel.name)),
                                                      f"no servable version of {sel.name}"))
            return self.loaded.get((sel.name, v)) or await self._load(sel.name, v)
        return self.loaded.get((sel.name, sel.version)) or await self._load(sel.name, sel.version)

    def _max_refused(self, name: str) -> int:
        return max((v for n, v in self.refused if n == name), default=0)

    @asynccontextmanager
    async def acquire(self, selector: str) -> AsyncIterator[LoadedVersion | None]:
        """Hold one adapter version (None = base) for the length of a request."""
        if not selector:
            yield None
            return
        sel = parse_selector(selector)
        lv = await self.resolve(sel)
        # A version resolved by joining another request's load may have been evicted before
        # this coroutine ran again: resolve anew. From the check on, no await until active
        # counts us, so neither unloading nor eviction can race us.
        while self.loaded.get((lv.record.name, lv.record.version)) is not lv:
            lv = await self.resolve(sel)
        lv.active += 1
        lv.last_used = time.monotonic()
        try:
            yield lv
        finally:
            lv.active -= 1
            if lv.active == 0:
                await self._unload_drained(sel.name)

    async def _unload_drained(self, name: str) -> None:
        """Unload the drained old versions of a followed name (training moves past them); other
        names' versions stay until least recently used (`capacity`)."""
        if name not in self.followed and self.capacity is not None:
            return
        for key, lv in list(self.loaded.items()):
            # Re-checked for each: the awaits below let other requests end (and drain the same
            # versions) or the latest move meanwhile.
            if (key[0] == name and key[1] != self.latest.get(name) and lv.active == 0
                    and self.loaded.get(key) is lv):
                await self._unload(key)
                log.info("unloaded %s (drained)", lv.record.ref)

    async def _unload(self, key: tuple[str, int]) -> LoadedVersion:
        """Take a version out of the engine and the local cache."""
        lv = self.loaded.pop(key)
        self._notify()
        await self.engine.remove_lora(lv.handle)
        shutil.rmtree(lv.handle.path, ignore_errors=True)
        return lv

    async def _evict_beyond_capacity(self, keep: tuple[str, int]) -> None:
        """Unload the least recently used idle versions while more than `capacity` are loaded."""
        if self.capacity is None:
            return
        while len(self.loaded) > self.capacity:
            idle = [(lv.last_used, k) for k, lv in self.loaded.items() if lv.active == 0 and k != keep]
            if not idle:
                return  # every one is in use: the engine's own LRU copes until they drain
            _, key = min(idle)
            self.evicted.add(key)
            lv = await self._unload(key)
            if self.observer is not None:
                self.observer.adapter_evicted(key[0])
            log.info("evicted %s (least recently used; %d loaded)", lv.record.ref, len(self.loaded))

    def close(self) -> None:
        shutil.rmtree(self.cache_dir, ignore_errors=True)
