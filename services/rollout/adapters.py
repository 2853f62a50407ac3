"""AdapterManager: which adapter versions a rollout server holds, and which one serves a request.

- `name`/`name@latest` resolves at admission to the newest version *loaded into the engine*
  (`latest` moves only after a new version has loaded); `name@vN` pins a version.
- A request holds its version (`active` count) until it ends; an old version is unloaded
  only once no request holds it, and is fetched again if a later request pins it.
- An adapter for another base, above `max_lora_rank`, for modules the model lacks, or with
  bytes that do not hash to their record is refused with a clear error; serving goes on.

The engine and the broker are injected (see `LoraEngine`, `AdapterSource`), so this logic is
unit-tested with fakes and integration-tested with vLLM and a real broker.
"""

from __future__ import annotations

import asyncio
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
from typing import Protocol

from services.common import scratch
from services.common.errors import FailedPrecondition, InvalidArgument, LoraloopError, NotFound
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


class AdapterRefused(FailedPrecondition):
    """This server will not serve that adapter version (base, rank, modules or bytes)."""


class LoraEngine(Protocol):
    async def add_lora(self, lora: LoraHandle) -> None: ...
    async def remove_lora(self, lora: LoraHandle) -> None: ...


class AdapterSource(Protocol):
    """The broker, as the manager needs it (BrokerClient fits; called from a thread)."""

    def get(self, selector: str) -> AdapterVersion: ...
    def fetch(self, selector: str) -> tuple[AdapterVersion, bytes]: ...

    # A source whose fetch already checked the bytes against record.sha256 sets this True
    # (BrokerClient hashes as the bytes arrive), so they are not hashed a second time.
    verifies_sha256: bool

    # Optional (BrokerClient has it; the manager uses it when present and verifies_sha256):
    # def fetch_to_file(self, selector: str, path: Path) -> AdapterVersion
    # writes the verified bytes to `path` as they arrive, so the local cache write overlaps the
    # transfer instead of following it.


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


CACHE_PREFIX = "loraloop-adapters-"


def default_cache_dir() -> Path:
    """A new cache dir in RAM where there is /dev/shm; those of rollout servers that died
    (SIGKILL, OOM) are removed first, so replaced replicas do not pile adapters up in RAM."""
    return scratch.claim(scratch.ram_or_temp(), CACHE_PREFIX)


class AdapterManager:
    def __init__(self, engine: LoraEngine, source: AdapterSource, base: BaseModel, cache_dir: Path) -> None:
        self.engine, self.source, self.base = engine, source, base
        self.cache_dir = cache_dir
        self.loaded: dict[tuple[str, int], LoadedVersion] = {}
        self.latest: dict[str, int] = {}
        self.refused: dict[tuple[str, int], str] = {}
        self._loading: dict[tuple[str, int], asyncio.Future[LoadedVersion]] = {}
        self._next_id = 1
        self.followed: set[str] = set()
        # Called with an adapter name the first time a request loads it, so that name is
        # followed from then on (its @latest keeps moving). The server wires the follower here.
        self.on_first_use = lambda name: None
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

    def _streams_to_file(self) -> bool:
        return callable(getattr(self.source, "fetch_to_file", None)) and getattr(self.source, "verifies_sha256", False)

    async def _fetch(self, selector: str, path: Path | None = None) -> tuple[AdapterVersion, bytes | None]:
        """(record, bytes); with `path`, the bytes are written there instead (fetch_to_file)."""
        try:
            if path is not None:
                return await asyncio.to_thread(self.source.fetch_to_file, selector, path), None  # type: ignore[attr-defined]
            return await asyncio.to_thread(self.source.fetch, selector)
        except LoraloopError:
            raise
        except Exception as e:  # BrokerError: keep its status meaning
            code = getattr(getattr(e, "code", None), "name", "")
            if code == "NOT_FOUND":
                raise NotFound(f"{selector}: {getattr(e, 'details', e)}") from None
            if code == "DATA_LOSS":  # not remembered as refused: a later fetch may get good bytes
                log.error("refused %s: fetched bytes are corrupt (%s)", selector, getattr(e, "details", e))
                raise AdapterRefused(f"{selector}: bytes are corrupt ({getattr(e, 'details', e)})") from None
            raise

    async def load(self, record: AdapterVersion | None, selector: str | None = None) -> LoadedVersion:
        """Fetch, verify, write to the local cache and load into the engine (once per version)."""
        t0 = time.perf_counter()
        data: bytes | None = None
        if record is not None:
            key = (record.name, record.version)
        else:
            sel = parse_selector(selector or "")
            if sel.is_latest:  # which version, only the broker knows: fetch it to find out
                record, data = await self._fetch(str(sel))
                key = (record.name, record.version)
            else:  # pinned: join a load of it already under way instead of fetching it again
                key = (sel.name, sel.version)
        if key in self.loaded:
            return self.loaded[key]
        if key in self.refused:
            raise AdapterRefused(self.refused[key])
        if key in self._loading:
            return await asyncio.shield(self._loading[key])
        fut: asyncio.Future[LoadedVersion] = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        tmp: Path | None = None
        try:
            if data is None:
                if self._streams_to_file():  # straight into the cache: the write overlaps the transfer
                    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.cache_dir))
                    record, data = await self._fetch(f"{key[0]}@v{key[1]}", tmp / WEIGHTS_NAME)
                else:
                    record, data = await self._fetch(f"{key[0]}@v{key[1]}")
            lv = await self._load_bytes(record, data, fetch_s=time.perf_counter() - t0, fetched_to=tmp)
            fut.set_result(lv)
            return lv
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._loading[key]
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)  # moved into the cache unless it failed

    async def _load_bytes(self, record: AdapterVersion, data: bytes | None, fetch_s: float,
                          fetched_to: Path | None = None) -> LoadedVersion:
        """Check, cache and load a version whose bytes are `data`, or (data None) already in
        `fetched_to`/adapter_model.safetensors, verified by the source."""
        key = (record.name, record.version)
        t0 = time.perf_counter()
        try:
            # In a thread: checking and writing tens of MB must not stall the requests being
            # streamed from this event loop meanwhile.
            path = await asyncio.to_thread(self._check_and_cache, record, data, fetched_to)
        except AdapterRefused as e:
            self.refused[key] = str(e)
            self._notify()
            log.error("refused adapter: %s", e)
            raise
        handle = LoraHandle(record.ref, self._next_id, str(path))
        self._next_id += 1
        t1 = time.perf_counter()
        try:
            await self.engine.add_lora(handle)
        except RuntimeError as e:
            shutil.rmtree(path, ignore_errors=True)
            self.refused[key] = str(e)
            self._notify()
            log.error("refused adapter %s: %s", record.ref, e)
            raise AdapterRefused(str(e)) from None
        lv = LoadedVersion(record, handle)
        self.loaded[key] = lv
        self.loads += 1
        self._notify()
        t2 = time.perf_counter()
        log.info("loaded %s (lora id %d, %d bytes; fetch %.1f ms, check + cache %.1f ms, engine %.1f ms)",
                 record.ref, handle.lora_id, record.size_bytes, fetch_s * 1e3, (t1 - t0) * 1e3,
                 (t2 - t1) * 1e3)
        return lv

    def _check_and_cache(self, record: AdapterVersion, data: bytes | None, fetched_to: Path | None = None) -> Path:
        if data is None:  # fetched straight into fetched_to, hashed on the way: check its header
            if fetched_to is None:
                raise ValueError("_check_and_cache needs the bytes or the directory they were fetched to")
            weights = fetched_to / WEIGHTS_NAME
            check_adapter(record, read_safetensors_prefix(weights), self.base, sha256_verified=True,
                          size=weights.stat().st_size)
            tmp = fetched_to
        else:
            check_adapter(record, data, self.base, getattr(self.source, "verifies_sha256", False))
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.cache_dir))
            (tmp / WEIGHTS_NAME).write_bytes(data)
        path = self.cache_dir / record.name / f"v{record.version}"
        (tmp / CONFIG_NAME).write_text(json.dumps(json.loads(record.adapter_config_json)))
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        return path

    async def on_published(self, record: AdapterVersion) -> None:
        """A version announced by the broker: load it, then move `latest` to it."""
        try:
            await self.load(record)
        except (AdapterRefused, NotFound) as e:
            log.warning("not serving %s: %s", record.ref, e)
            return
        if record.version > self.latest.get(record.name, 0):
            self.latest[record.name] = record.version
            self._notify()
            log.info("%s@latest is now v%d", record.name, record.version)
        await self._unload_drained(record.name)

    # ------------------------------------------------------------ admission

    async def resolve(self, sel: AdapterSelector) -> LoadedVersion:
        if sel.is_latest:
            v = self.latest.get(sel.name)
            if v is None:  # not followed or nothing loaded yet: ask the broker once
                await self.on_published((await self._fetch(f"{sel.name}@latest"))[0])
                v = self.latest.get(sel.name)
                if sel.name not in self.followed:
                    self.followed.add(sel.name)
                    self.on_first_use(sel.name)
                if v is None:
                    raise AdapterRefused(self.refused.get((sel.name, self._max_refused(sel.name)),
                                                          f"no servable version of {sel.name}"))
            return self.loaded.get((sel.name, v)) or await self.load(None, f"{sel.name}@v{v}")
        return self.loaded.get((sel.name, sel.version)) or await self.load(None, str(sel))

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
        lv.active += 1  # no await between resolve's return and here: GC cannot race us
        try:
            yield lv
        finally:
            lv.active -= 1
            if lv.active == 0:
                await self._unload_drained(sel.name)

    async def _unload_drained(self, name: str) -> None:
        latest = self.latest.get(name)
        for key, lv in list(self.loaded.items()):
            if key[0] == name and key[1] != latest and lv.active == 0:
                del self.loaded[key]
                self._notify()
                await self.engine.remove_lora(lv.handle)
                shutil.rmtree(lv.handle.path, ignore_errors=True)
                log.info("unloaded %s (drained)", lv.record.ref)

    def close(self) -> None:
        shutil.rmtree(self.cache_dir, ignore_errors=True)
