"""AdapterManager logic with a fake engine and a fake broker: latest moves only after a
load, versions unload only when drained, refusals keep the old version, one load per version."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import pytest

from services.common.errors import FailedPrecondition, NotFound
from services.common.names import parse_selector
from services.common.records import AdapterVersion
from services.rollout.adapters import AdapterManager, AdapterRefused, BaseModel
from tests.support.adapters import make_adapter

FP = "sha256:base"
WEIGHTS = frozenset(f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj"))


class FakeEngine:
    def __init__(self, fail: set[str] | None = None) -> None:
        self.loaded: dict[int, str] = {}
        self.calls: list[str] = []
        self.fail = fail or set()

    async def add_lora(self, lora) -> None:
        await asyncio.sleep(0.01)
        self.calls.append(f"add {lora.lora_name}")
        if lora.lora_name in self.fail:
            raise RuntimeError(f"engine refused {lora.lora_name}")
        self.loaded[lora.lora_id] = lora.lora_name

    async def remove_lora(self, lora) -> None:
        self.calls.append(f"remove {lora.lora_name}")
        self.loaded.pop(lora.lora_id, None)


class FakeBroker:
    """An adapter source that does not check the bytes it hands over (the manager hashes them)."""

    verifies_sha256 = False

    def __init__(self) -> None:
        self.versions: dict[tuple[str, int], tuple[AdapterVersion, bytes]] = {}
        self.fetches = 0
        self.to_file = 0

    def publish(self, name: str, seed: int, fingerprint: str = FP, rank: int = 4) -> AdapterVersion:
        cfg, data = make_adapter(seed=seed, rank=rank)
        v = 1 + max((k[1] for k in self.versions if k[0] == name), default=0)
        rec = AdapterVersion(name, v, hashlib.sha256(data).hexdigest(), len(data), fingerprint, rank,
                             2.0 * rank, ("q_proj", "v_proj"), adapter_config_json=json.dumps(cfg))
        self.versions[(name, v)] = (rec, data)
        return rec

    def get(self, selector: str) -> AdapterVersion:
        return self.fetch(selector)[0]

    def fetch(self, selector: str):
        self.fetches += 1
        name, _, ver = selector.partition("@")
        v = max((k[1] for k in self.versions if k[0] == name), default=0) if ver in ("", "latest") else int(ver[1:])
        if (name, v) not in self.versions:
            raise NotFound(selector)
        return self.versions[(name, v)]


    def fetch_to_file(self, selector: str, path):
        rec, data = self.fetch(selector)
        self.to_file += 1
        path.write_bytes(data)
        return rec


class FakeFileBroker(FakeBroker):
    """A source that verifies the bytes against the record on the way, as
    BrokerClient.fetch_to_file does."""

    verifies_sha256 = True


class FakeWatcher:
    def __init__(self) -> None:
        self.watched: list[tuple[str, int]] = []

    def watch(self, name: str, after: int) -> None:
        self.watched.append((name, after))


BROKERS = {"unverified": FakeBroker, "verified": FakeFileBroker}


@pytest.fixture(params=list(BROKERS))
def make_broker(request):
    return BROKERS[request.param]


@pytest.fixture
def setup(tmp_path, make_broker):
    engine, broker = FakeEngine(), make_broker()
    manager = AdapterManager(engine, broker, BaseModel(FP, WEIGHTS, 16), tmp_path)
    return engine, broker, manager


def leftovers(cache) -> list:
    """Temporary directories the manager left in its cache."""
    return list(cache.glob(".tmp-*"))


def run(coro):
    return asyncio.run(coro)


def test_latest_resolves_at_admission_and_old_version_drains(setup):
    engine, broker, m = setup

    async def scenario():
        await m.on_published(broker.publish("p", 1))
        async with m.acquire("p") as held:
            assert held.record.version == 1
            await m.on_published(broker.publish("p", 2))
            assert m.latest["p"] == 2
            assert ("p", 1) in m.loaded  # still held by the running request
            async with m.acquire("p@latest") as newer:
                assert newer.record.version == 2
        assert set(m.loaded) == {("p", 2)}  # v1 unloaded once drained
        assert engine.calls == ["add p@v1", "add p@v2", "remove p@v1"]

    run(scenario())


def test_requests_ending_together_drain_each_old_version_once(tmp_path, make_broker):
    """Two requests holding two old versions end while the engine's unload yields: each
    version is unloaded once (seen in the chaos run: the second drain popped a version the first
    had already unloaded, KeyError, and a finished request answered 500)."""

    class SlowRemove(FakeEngine):
        async def remove_lora(self, lora) -> None:
            await asyncio.sleep(0.02)
            await super().remove_lora(lora)

    engine, broker = SlowRemove(), make_broker()
    m = AdapterManager(engine, broker, BaseModel(FP, WEIGHTS, 16), tmp_path)

    async def hold(selector: str, release: asyncio.Event) -> None:
        async with m.acquire(selector):
            await release.wait()

    async def scenario():
        for seed in (1, 2, 3):
            await m.on_published(broker.publish("p", seed))
        release = asyncio.Event()
        held = [asyncio.create_task(hold(sel, release)) for sel in ("p@v1", "p@v2")]
        await _until(lambda: ("p", 1) in m.loaded and ("p", 2) in m.loaded and m.loaded[("p", 2)].active)
        release.set()
        await asyncio.gather(*held)  # raised KeyError before the fix
        assert set(m.loaded) == {("p", 3)}
        for v in ("p@v1", "p@v2"):  # each load (as latest, then pinned again) unloaded once
            assert engine.calls.count(f"remove {v}") == engine.calls.count(f"add {v}") == 2, engine.calls

    run(scenario())


def test_pinned_old_version_is_fetched_again(setup):
    _engine, broker, m = setup

    async def scenario():
        await m.on_published(broker.publish("p", 1))
        await m.on_published(broker.publish("p", 2))
        assert set(m.loaded) == {("p", 2)}
        async with m.acquire("p@v1") as lv:
            assert lv.record.version == 1 and lv.handle.lora_id == 3  # ids are never reused
        assert set(m.loaded) == {("p", 2)}

    run(scenario())


def test_refused_version_keeps_serving_the_old_one(setup):
    _engine, broker, m = setup

    async def scenario():
        await m.on_published(broker.publish("p", 1))
        await m.on_published(broker.publish("p", 2, fingerprint="sha256:other"))
        await m.on_published(broker.publish("p", 3, rank=32))
        assert m.latest["p"] == 1
        assert "trained on base" in m.refused[("p", 2)] and "max_lora_rank 16" in m.refused[("p", 3)]
        with pytest.raises(AdapterRefused, match="trained on base"):
            async with m.acquire("p@v2"):
                pass
        async with m.acquire("p") as lv:
            assert lv.record.version == 1

    run(scenario())


def test_engine_refusal_is_recorded(tmp_path, make_broker):
    broker = make_broker()
    m = AdapterManager(FakeEngine(fail={"p@v1"}), broker, BaseModel(FP, WEIGHTS, 16), tmp_path)
    rec = broker.publish("p", 1)

    async def scenario():
        with pytest.raises(AdapterRefused, match="engine refused"):
            await m.load(rec)
        assert ("p", 1) in m.refused and ("p", 1) not in m.loaded
        assert not list(tmp_path.glob("p/v1")) and not leftovers(tmp_path)  # nothing left in the cache

    run(scenario())


def test_missing_modules_refused(tmp_path, make_broker):
    broker = make_broker()
    m = AdapterManager(FakeEngine(), broker, BaseModel(FP, frozenset({"model.layers.0.self_attn.q_proj.weight"}), 16),
                       tmp_path)

    async def scenario():
        with pytest.raises(AdapterRefused, match="lacks"):
            await m.load(broker.publish("p", 1))
        assert not leftovers(tmp_path)

    run(scenario())


def test_concurrent_requests_load_a_version_once(setup):
    engine, broker, m = setup
    broker.publish("p", 1)

    async def scenario():
        async def use():
            async with m.acquire("p@v1") as lv:
                await asyncio.sleep(0.01)
                return lv.handle.lora_id

        ids = await asyncio.gather(*(use() for _ in range(8)))
        assert set(ids) == {1} and engine.calls.count("add p@v1") == 1
        assert broker.fetches == 1  # the bytes too: the other seven waited for the first load

    run(scenario())


def test_a_request_pinning_a_version_being_loaded_waits_for_that_load(setup):
    engine, broker, m = setup
    rec = broker.publish("p", 1)

    async def scenario():
        announced = asyncio.create_task(m.on_published(rec))  # the follower's load
        await asyncio.sleep(0)  # it is under way (fetching)
        async with m.acquire("p@v1") as lv:
            assert lv.record.version == 1
        await announced
        assert broker.fetches == 1 and engine.calls.count("add p@v1") == 1

    run(scenario())


@pytest.fixture
def watched(setup):
    """(broker, manager, watcher): the setup with a watcher that records what it is asked to watch."""
    _engine, broker, m = setup
    m.watcher = FakeWatcher()
    return broker, m, m.watcher


def test_first_use_of_an_unfollowed_name_starts_following(watched):
    broker, m, watcher = watched
    broker.publish("q", 1)

    async def scenario():
        async with m.acquire("q") as lv:
            assert lv.record.version == 1
        async with m.acquire("q"):
            pass

    run(scenario())
    assert watcher.watched == [("q", 1)] and "q" in m.followed


@pytest.mark.parametrize("source_verifies", [False, True])
def test_bytes_are_hashed_unless_the_source_verified_them(tmp_path, monkeypatch, source_verifies):
    """A source that does not verify: corrupt bytes are refused here. One that does (BrokerClient
    hashes while it streams): no second sha256 pass over the bytes (~17 ms for 35 MB)."""
    broker = FakeBroker()
    broker.verifies_sha256 = source_verifies
    m = AdapterManager(FakeEngine(), broker, BaseModel(FP, WEIGHTS, 16), tmp_path)
    rec = broker.publish("p", 1)
    good = broker.versions[("p", 1)][1]
    broker.versions[("p", 1)] = (rec, good[:-4] + bytes(4))  # same length, other bytes
    hashed = []
    real_sha256 = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: hashed.append(1) or real_sha256(*a))

    async def scenario():
        if source_verifies:
            await m.load(rec)
            assert not hashed and ("p", 1) in m.loaded
        else:
            with pytest.raises(AdapterRefused, match="corrupt"):
                await m.load(rec)
            assert hashed and ("p", 1) in m.refused

    run(scenario())


def test_a_source_that_streams_to_a_file_fills_the_cache_directly(tmp_path):
    broker = FakeFileBroker()
    m = AdapterManager(FakeEngine(), broker, BaseModel(FP, WEIGHTS, 16), tmp_path)
    rec = broker.publish("p", 1)
    bad = broker.publish("p", 2, fingerprint="sha256:other")

    async def scenario():
        lv = await m.load(rec)
        path = Path(lv.handle.path)
        assert path.parent == tmp_path / "p" and path.name == f"v1.{lv.handle.lora_id}"
        assert (path / "adapter_model.safetensors").read_bytes() == broker.versions[("p", 1)][1]
        assert json.loads((path / "adapter_config.json").read_text())["r"] == 4
        with pytest.raises(AdapterRefused, match="trained on base"):
            await m.load(bad)
        assert broker.to_file == 2 and broker.fetches == 2 and not leftovers(tmp_path)
        assert not list((tmp_path / "p").glob("v2*"))

    run(scenario())


def test_a_head_of_the_bytes_is_only_checked_once_verified():
    cfg, data = make_adapter(seed=1, rank=4)
    rec = AdapterVersion("p", 1, hashlib.sha256(data).hexdigest(), len(data), FP, 4, 8.0, ("q_proj", "v_proj"),
                         adapter_config_json=json.dumps(cfg))
    from services.rollout.adapters import check_adapter

    base = BaseModel(FP, WEIGHTS, 16)
    head = data[: 8 + int.from_bytes(data[:8], "little")]
    check_adapter(rec, head, base, sha256_verified=True, size=len(data))
    with pytest.raises(AdapterRefused, match="corrupt"):
        check_adapter(rec, head, base, sha256_verified=True, size=len(data) - 1)
    with pytest.raises(ValueError, match="verified"):
        check_adapter(rec, head, base, size=len(data))


def test_changes_set_the_changed_event(setup):
    """WatchAdapters waits on manager.changed(): set by a load, a move of latest, a refusal and
    an unload; not by a request that only uses what is loaded."""
    _engine, broker, m = setup

    async def scenario():
        ev = m.changed()
        assert m.changed() is ev and not ev.is_set()  # one event until something changes
        await m.on_published(broker.publish("p", 1))
        assert ev.is_set() and m.changed() is not ev
        ev = m.changed()
        async with m.acquire("p"):
            pass
        assert not ev.is_set()  # using v1 changed nothing
        async with m.acquire("p"):
            await m.on_published(broker.publish("p", 2))  # loaded + latest (v1 still held)
            assert ev.is_set()
            ev = m.changed()
        assert ev.is_set() and set(m.loaded) == {("p", 2)}  # v1 unloaded once drained
        ev = m.changed()
        await m.on_published(broker.publish("p", 3, rank=32))
        assert ev.is_set() and ("p", 3) in m.refused

    run(scenario())


def test_follow_loads_the_newest_then_hands_the_name_to_the_watcher(tmp_path):
    broker, watcher = FakeBroker(), FakeWatcher()
    m = AdapterManager(FakeEngine(), broker, BaseModel(FP, WEIGHTS, 16), tmp_path, watcher=watcher)
    broker.publish("p", 1)
    broker.publish("p", 2)

    async def scenario():
        await m.follow("p")
        await m.follow("p")  # once per name
        await m.follow("later")  # nothing published yet: followed from v0
        assert watcher.watched == [("p", 2), ("later", 0)] and m.followed == {"p", "later"}
        assert m.latest == {"p": 2} and set(m.loaded) == {("p", 2)}
        with pytest.raises(NotFound):  # a request for an unknown name does not follow it
            async with m.acquire("nobody"):
                pass
        assert "nobody" not in m.followed and len(watcher.watched) == 2

    run(scenario())


def test_wait_for_returns_when_the_version_is_loaded_and_times_out_at_the_deadline(watched):
    broker, m, watcher = watched
    broker.publish("p", 1)

    async def scenario():
        waiter = asyncio.create_task(m.wait_for("p", 2, time.time() + 5))
        await asyncio.sleep(0.05)
        assert not waiter.done() and watcher.watched == [("p", 1)]  # followed, v1 loaded, waiting
        await m.on_published(broker.publish("p", 2))  # what the watcher delivers
        await asyncio.wait_for(waiter, 1)
        await m.wait_for("p", 2, time.time())  # already there: no wait, even at the deadline
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="p@v3"):
            await m.wait_for("p", 3, time.time() + 0.2)
        assert 0.15 < time.monotonic() - t0 < 2

    run(scenario())


class RecordingObserver:
    def __init__(self) -> None:
        self.loads: list[tuple[str, bool]] = []
        self.evictions: list[str] = []

    def adapter_loaded(self, name: str, seconds: float, swap: bool) -> None:
        assert seconds >= 0
        self.loads.append((name, swap))

    def adapter_evicted(self, name: str) -> None:
        self.evictions.append(name)


@pytest.fixture
def bounded(tmp_path):
    engine, broker, obs = FakeEngine(), FakeBroker(), RecordingObserver()
    manager = AdapterManager(engine, broker, BaseModel(FP, WEIGHTS, 16), tmp_path, capacity=2, observer=obs)
    return engine, broker, manager, obs


async def _use(manager, selector: str) -> None:
    async with manager.acquire(selector):
        pass


def test_capacity_evicts_the_least_recently_used_and_counts_swaps(bounded):
    engine, broker, manager, obs = bounded
    for name in ("a", "b", "c"):
        broker.publish(name, seed=ord(name))

    async def go():
        await _use(manager, "a@v1")
        await _use(manager, "b@v1")
        await _use(manager, "a@v1")  # a is now more recent than b
        await _use(manager, "c@v1")  # 3 > capacity 2: b goes
        assert set(manager.loaded) == {("a", 1), ("c", 1)}
        assert "remove b@v1" in engine.calls and len(engine.loaded) == 2
        await _use(manager, "b@v1")  # fetched again: a swap; a (least recent now) goes
        assert set(manager.loaded) == {("c", 1), ("b", 1)}

    asyncio.run(go())
    assert obs.loads == [("a", False), ("b", False), ("c", False), ("b", True)]
    assert obs.evictions == ["b", "a"]
    assert broker.to_file == 4


def test_versions_in_use_are_never_evicted(bounded):
    _engine, broker, manager, obs = bounded
    for name in ("a", "b", "c"):
        broker.publish(name, seed=ord(name))

    async def go():
        async with manager.acquire("a@v1"), manager.acquire("b@v1"), manager.acquire("c@v1") as c:
            assert c.record.ref == "c@v1"
            assert len(manager.loaded) == 3 and obs.evictions == []  # all busy: over capacity for now
        await _use(manager, "c@v1")  # a load or a use of an idle one does not shrink by itself...
        broker.publish("d", seed=4)
        await _use(manager, "d@v1")  # ...the next load evicts down to capacity, oldest first
        assert set(manager.loaded) == {("c", 1), ("d", 1)}

    asyncio.run(go())
    assert obs.evictions == ["a", "b"]


def test_a_version_evicted_before_its_waiter_ran_is_loaded_again(bounded):
    """Two requests join one load; a third load evicts it before the second request resumes:
    that request must not be handed the evicted version (its files are gone)."""
    _engine, broker, manager, _obs = bounded
    for name in ("a", "b", "c"):
        broker.publish(name, seed=ord(name))

    async def go():
        got = []

        async def user(sel):
            async with manager.acquire(sel) as lv:
                assert manager.loaded.get((lv.record.name, lv.record.version)) is lv
                got.append(lv.record.ref)

        await asyncio.gather(user("a@v1"), user("a@v1"), _use(manager, "b@v1"), _use(manager, "c@v1"))
        return got

    assert asyncio.run(go()) == ["a@v1", "a@v1"]


def test_followed_names_unload_old_versions_unbounded_names_stay_cached(bounded):
    _engine, broker, manager, _obs = bounded
    broker.publish("pol", seed=1)
    broker.publish("user", seed=2)

    async def go():
        await manager.follow("pol")
        await manager.on_published(broker.publish("pol", seed=3))
        assert ("pol", 1) not in manager.loaded  # training moved on: v1 unloaded once drained
        await _use(manager, "user@v1")
        assert ("user", 1) in manager.loaded  # kept for its next request, until LRU

    asyncio.run(go())


class GatedEngine(FakeEngine):
    """remove_lora waits for `gate`: an unload held half-way."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def remove_lora(self, lora) -> None:
        self.calls.append(f"remove {lora.lora_name}")
        await self.gate.wait()
        self.loaded.pop(lora.lora_id, None)


def test_a_pinned_reload_during_the_unload_of_its_version_keeps_its_files(tmp_path):
    # Seen under 32 streaming clients pinning versions while training published new ones: the
    # drained version's unload removed its directory after a pinned request had loaded it
    # again into the same directory; the engine then found no adapter there.
    broker, engine = FakeBroker(), GatedEngine()
    m = AdapterManager(engine, broker, BaseModel(FP, WEIGHTS, 16), tmp_path)
    broker.publish("p", 1)

    async def scenario():
        await m.follow("p")
        task = asyncio.create_task(m.on_published(broker.publish("p", 2)))  # unloads v1 once v2 is in
        while "remove p@v1" not in engine.calls:
            await asyncio.sleep(0.001)
        async with m.acquire("p@v1") as lv:  # pinned: loads v1 again while its unload is under way
            engine.gate.set()
            await task
            assert (Path(lv.handle.path) / "adapter_model.safetensors").is_file()
            assert m.loaded[("p", 1)] is lv and m.latest["p"] == 2

    run(scenario())


# ------------------------------------------------------------------ staged loads


class FakeStagedBroker(FakeFileBroker):
    """A source with fetch_staged: the bytes go to `path` and `on_bytes` runs as soon as the
    test stages them; the call then returns when the test commits them (`outcome`: the record,
    or an error to raise)."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        self.committed: dict[str, object] = {}
        self.cond = threading.Condition()
        self.staged_fetches = 0

    def commit(self, sha256: str, outcome) -> None:
        with self.cond:
            self.committed[sha256] = outcome
            self.cond.notify_all()

    def fetch_staged(self, sha256: str, path, on_bytes=None):
        self.staged_fetches += 1
        rec, data = next(v for v in self.versions.values() if v[0].sha256 == sha256)
        if sha256 in self.committed and isinstance(self.committed[sha256], NotFound):
            raise self.committed[sha256]
        path.write_bytes(data)
        if on_bytes:
            on_bytes(rec)
        with self.cond:
            self.cond.wait_for(lambda: sha256 in self.committed, timeout=10)
            outcome = self.committed.get(sha256, TimeoutError("test never committed"))
        if isinstance(outcome, Exception):
            path.unlink(missing_ok=True)
            raise outcome
        return outcome


def _staged(rec: AdapterVersion) -> AdapterVersion:
    """What a STAGED event carries: the record, version 0."""
    from dataclasses import replace

    return replace(rec, version=0)


@pytest.fixture
def staged_setup(tmp_path):
    engine, broker = FakeEngine(), FakeStagedBroker()
    m = AdapterManager(engine, broker, BaseModel(FP, WEIGHTS, 16), tmp_path)
    m.watcher = FakeWatcher()
    return engine, broker, m


async def _staged_in_engine(engine: FakeEngine, broker: FakeStagedBroker, m: AdapterManager,
                            seed: int) -> AdapterVersion:
    """Follow "p", publish a version of it, announce its upload and wait until the staged
    load is in the engine; returns the version's record (not yet committed)."""
    await m.follow("p")
    rec = broker.publish("p", seed=seed)
    m.on_staged(_staged(rec))
    await _until(lambda: any(c.startswith("add p@staged.") for c in engine.calls))
    return rec


async def _until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_staged_load_is_not_served_until_committed_then_becomes_the_version(staged_setup, tmp_path):
    engine, broker, m = staged_setup

    async def scenario():
        rec = await _staged_in_engine(engine, broker, m, seed=1)
        # Loaded into the engine, but no request can have it: not a version yet.
        assert m.loaded == {} and "p" not in m.latest
        with pytest.raises(AdapterRefused):
            await m.resolve(parse_selector("p@latest"))
        broker.commit(rec.sha256, rec)
        await _until(lambda: m.latest.get("p") == 1)
        lv = m.loaded[("p", 1)]
        assert lv.handle.lora_name == "p@v1" and lv.handle.lora_id in engine.loaded
        await m.on_published(rec)  # the PUBLISHED event after: nothing fetched or loaded again
        assert broker.to_file == 0 and broker.staged_fetches == 1
        assert [c for c in engine.calls if c.startswith("add")] == [f"add p@staged.{lv.handle.lora_id}"]
        async with m.acquire("p@latest") as got:
            assert got.record.version == 1 and got.handle.path == lv.handle.path
        assert leftovers(tmp_path) == []

    run(scenario())


def test_published_event_first_joins_the_staged_load(staged_setup):
    engine, broker, m = staged_setup

    async def scenario():
        rec = await _staged_in_engine(engine, broker, m, seed=2)
        published = asyncio.create_task(m.on_published(rec))  # arrives before the commit's answer
        await asyncio.sleep(0.05)
        assert not published.done()
        broker.commit(rec.sha256, rec)
        await published
        assert m.latest["p"] == 1 and broker.to_file == 0
        assert len([c for c in engine.calls if c.startswith("add")]) == 1

    run(scenario())


def test_staged_load_whose_commit_fails_is_dropped(staged_setup, tmp_path):
    engine, broker, m = staged_setup

    async def scenario():
        rec = await _staged_in_engine(engine, broker, m, seed=3)
        broker.commit(rec.sha256, FailedPrecondition("stale publisher epoch"))
        await _until(lambda: any(c.startswith("remove p@staged.") for c in engine.calls))
        await _until(lambda: not m._staged)
        assert m.loaded == {} and "p" not in m.latest and engine.loaded == {}
        assert [d for d in tmp_path.rglob("*") if d.is_file()] == []  # nothing left in the cache

    run(scenario())


def test_failed_staged_fetch_falls_back_to_the_published_event(staged_setup):
    _engine, broker, m = staged_setup

    async def scenario():
        await m.follow("p")
        rec = broker.publish("p", seed=4)
        broker.commit(rec.sha256, NotFound("no upload of that sha256 in progress"))
        m.on_staged(_staged(rec))
        await m.on_published(rec)
        assert m.latest["p"] == 1 and broker.to_file == 1 and broker.staged_fetches == 1
        assert m.loaded[("p", 1)].handle.lora_name == "p@v1"

    run(scenario())


def test_staged_uploads_of_unfollowed_names_or_another_base_are_ignored(staged_setup):
    engine, broker, m = staged_setup

    async def scenario():
        m.on_staged(_staged(broker.publish("nobody-follows", seed=5)))
        await m.follow("p")
        m.on_staged(_staged(broker.publish("p", seed=6, fingerprint="sha256:other")))
        await asyncio.sleep(0.05)
        assert broker.staged_fetches == 0 and engine.calls == []

    run(scenario())
