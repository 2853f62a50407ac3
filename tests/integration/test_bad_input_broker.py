"""Bad input against a real broker over loopback (issue 19, "Bad input, everywhere it enters"):
raw bytes to every method, publishes with every header field and body wrong, reads of
unknown, retired and impossible versions, watches of bad names and cut off mid-way, an
oversized message. Each gets a clear status (never INTERNAL/UNKNOWN, never a hang), the
broker keeps serving, and nothing committed changes: versions, their sha256 and bytes,
epochs and pins are compared before and after each batch, and no staging key is left."""

from __future__ import annotations

import hashlib
import json
import struct
import time
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from loraloop.v1 import adapters_pb2 as pb
from services.broker.client import BrokerClient
from services.common.names import NAME_RE
from tests.support.adapters import make_adapter
from tests.support.bad_input import CASES, assert_clear, bounded, call_raw, register_summary
from tests.support.procs import TOKENS, BrokerProc, RedisProc

FP = "sha256:" + "cd" * 32
SVC = "/loraloop.v1.AdapterRegistry/"
MAX_ADAPTER = 1 << 20  # --registry.max_adapter_bytes: "too large" stays cheap
NAME = "bi"  # three versions published: v1 retired (keep_last=2), v2 and v3 live
GHOST = "ghost"  # a valid name nothing was ever published under


def md(role: str) -> tuple:
    return (("authorization", f"Bearer {TOKENS[role]}"),)


# method -> (kind, role allowed to call it)
METHODS = {
    "AcquirePublisher": ("uu", "learner"), "Publish": ("su", "learner"), "GetAdapter": ("uu", "client"),
    "ListVersions": ("uu", "client"), "ListAdapters": ("uu", "client"), "Fetch": ("us", "client"),
    "FetchStaged": ("us", "rollout"), "Pin": ("uu", "learner"), "Unpin": ("uu", "learner"),
    "Watch": ("us", "rollout"),
}
# A valid request per method to corrupt. Those that would change state (acquire, pin) name
# GHOST, so that a corruption that still parses changes nothing committed under NAME.
TEMPLATES = {
    "AcquirePublisher": pb.AcquirePublisherRequest(name=GHOST),
    "Publish": pb.PublishRequest(header=pb.PublishHeader(name=GHOST, epoch=1, size_bytes=64, sha256="0" * 64,
                                                         base_model_fingerprint=FP)),
    "GetAdapter": pb.GetAdapterRequest(ref=pb.AdapterRef(name=NAME, version=2)),
    "ListVersions": pb.ListVersionsRequest(name=NAME),
    "ListAdapters": pb.ListAdaptersRequest(),
    "Fetch": pb.FetchRequest(ref=pb.AdapterRef(name=NAME, version=3), chunk_bytes=4096),
    "FetchStaged": pb.FetchStagedRequest(sha256="ab" * 32),
    "Pin": pb.PinRequest(ref=pb.AdapterRef(name=GHOST, version=1)),
    "Unpin": pb.PinRequest(ref=pb.AdapterRef(name=GHOST, version=1)),
    "Watch": pb.WatchRequest(adapters=[pb.WatchFrom(name=NAME, after_version=0)]),
}
REQUEST_TYPE = {m: type(t) for m, t in TEMPLATES.items()}


@dataclass
class Broker:
    redis: RedisProc
    proc: BrokerProc
    channel: grpc.Channel
    epoch: int
    config: dict


@pytest.fixture(scope="module")
def broker(tmp_path_factory, request):
    register_summary(request.config)
    work = tmp_path_factory.mktemp("bad-input-broker")
    redis = RedisProc(work / "redis")
    proc = BrokerProc(redis.url, work, "--registry.keep_last=2", f"--registry.max_adapter_bytes={MAX_ADAPTER}")
    with BrokerClient(proc.target, TOKENS["learner"]) as c:
        epoch, _ = c.acquire_publisher(NAME)
        for seed in range(3):
            config, data = make_adapter(seed=seed)
            c.publish_bytes(NAME, epoch, config, data, FP, learner_step=seed)
    channel = grpc.insecure_channel(proc.target)
    yield Broker(redis, proc, channel, epoch, config)
    channel.close()
    proc.stop()
    redis.stop()


def snapshot(b: Broker) -> dict:
    """What is committed, as clients see it (names, latest, live count, epoch; each live
    version's record and the sha256 of the bytes Fetch serves), and staging keys left."""
    out: dict = {}
    with BrokerClient(b.proc.target, TOKENS["learner"]) as c:
        for s in c.list_adapters():
            records, latest = c.list_versions(s.name)
            out[s.name] = (s.latest_version, s.live_versions, s.publisher_epoch, latest,
                           [(r.version, r.sha256, r.pinned, r.size_bytes) for r in records])
            for r in records:
                got, data = c.fetch(f"{s.name}@v{r.version}")
                assert hashlib.sha256(data).hexdigest() == r.sha256 == got.sha256
    out["staging keys"] = b.redis.client().keys("ll:staging:*")
    return out


@pytest.fixture
def unchanged(broker):
    """The broker's committed state is the same after the test, and it still serves."""
    before = snapshot(broker)
    assert before[NAME][0] == 3 and [v for v, *_ in before[NAME][4]] == [2, 3]
    yield
    assert broker.proc.proc.poll() is None, "the broker died"
    assert snapshot(broker) == before


# ------------------------------------------------------------------ raw bytes, every method


def corrupted(template: bytes):
    """A valid message's bytes with one change: truncated, a byte flipped, bytes inserted,
    or a string field's content replaced by bytes that are not UTF-8."""
    n = len(template)
    return st.one_of(
        st.integers(0, max(0, n - 1)).map(lambda i: template[:i]),
        st.tuples(st.integers(0, max(0, n - 1)), st.integers(1, 255)).map(
            lambda t: template[: t[0]] + bytes([template[t[0]] ^ t[1]]) + template[t[0] + 1:] if n else b""),
        st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=8)).map(
            lambda t: template[: t[0]] + t[1] + template[t[0]:]),
        st.just(b"\x0a\x04\xff\xfe\xc0\x80" + template),  # field 1, length-delimited, bad UTF-8
    )


@st.composite
def raw_request(draw):
    method = draw(st.sampled_from(sorted(METHODS)))
    payload = draw(st.one_of(st.binary(max_size=48), corrupted(TEMPLATES[method].SerializeToString())))
    return method, payload


def _parses_to_a_wait(method: str, payload: bytes) -> bool:
    """A Watch that parses and names only valid adapters: it waits for events, legitimately."""
    if method != "Watch":
        return False
    try:
        req = pb.WatchRequest.FromString(payload)
    except Exception:
        return False
    names = [w.name for w in req.adapters]
    return bool(names) and len(set(names)) == len(names) and all(NAME_RE.fullmatch(n) and ".." not in n for n in names)


@bounded(160)
@given(case=raw_request())
def test_raw_bytes_to_every_method(broker, unchanged, case):
    method, payload = case
    kind, role = METHODS[method]
    CASES(f"broker {method} (raw bytes)")
    if kind == "su":
        # a stream of messages: the payload, or the payload after a valid header
        out = call_raw(broker.channel, SVC + method, kind, [payload], md(role))
    else:
        out = call_raw(broker.channel, SVC + method, kind, payload, md(role), timeout=2.0 if method == "Watch" else 10.0,
                       first_only=method == "Watch")
    if out.code == grpc.StatusCode.DEADLINE_EXCEEDED and _parses_to_a_wait(method, payload):
        return
    assert_clear(out, what=(method, payload))


# ------------------------------------------------------------------ publish


SIZES = st.one_of(st.sampled_from([0, 1, 7, 8, 64, MAX_ADAPTER, MAX_ADAPTER + 1, 2**63, 2**64 - 1]),
                  st.integers(0, 2**64 - 1))
NAMES = st.one_of(st.sampled_from(["", NAME, GHOST, "..", "a..b", "UPPER", "x" * 65, "é", "a/b", "a\x00b", "@v1"]),
                  st.text(max_size=70))
SHAS = st.one_of(st.sampled_from(["", "0" * 64, "A" * 64, "g" * 64, "0" * 63, "0" * 65]),
                 st.text(alphabet="0123456789abcdef", min_size=64, max_size=64))


@st.composite
def publish_stream(draw, epoch: int):
    """A publish whose body is never a valid adapter: junk, a safetensors header that does not
    check, or no bytes; its header fields drawn from valid and invalid values."""
    body = draw(st.one_of(st.binary(max_size=256), st.just(b""),
                          st.binary(min_size=8, max_size=64).map(lambda b: struct.pack("<Q", 2**63) + b)))
    right_sha = hashlib.sha256(body).hexdigest()
    header = pb.PublishHeader(
        name=draw(st.one_of(st.just(NAME), NAMES)),
        epoch=draw(st.sampled_from([epoch, 0, epoch + 1, 2**64 - 1])),
        base_model_fingerprint=draw(st.sampled_from([FP, "", "x" * 129, "é"])),
        learner_step=draw(st.sampled_from([0, 2**64 - 1])),
        adapter_config_json=draw(st.sampled_from([json.dumps(make_adapter()[0]), "", "{", "[]", "null",
                                                  '{"r": "4"}', '{"r": 0}', '{"r": 4, "lora_alpha": "x"}',
                                                  '{"r": 4, "peft_type": "IA3"}'])),
        size_bytes=draw(st.one_of(st.just(len(body)), SIZES)),
        sha256=draw(st.one_of(st.just(right_sha), SHAS)),
        publish_id=draw(st.sampled_from(["", "p1", "x" * 129])),
    )
    chunk = draw(st.integers(1, 64))
    parts = [pb.PublishRequest(chunk=body[i:i + chunk]) for i in range(0, len(body), chunk)]
    shape = draw(st.sampled_from(["header+chunks", "no header", "two headers", "header after chunks", "empty"]))
    h = pb.PublishRequest(header=header)
    msgs = {"header+chunks": [h, *parts], "no header": parts, "two headers": [h, *parts[:1], h, *parts[1:]],
            "header after chunks": [*parts[:1], h, *parts[1:]], "empty": []}[shape]
    return [m.SerializeToString() for m in msgs]


@bounded(120)
@given(data=st.data())
def test_publish_never_commits_a_bad_upload(broker, unchanged, data):
    msgs = data.draw(publish_stream(broker.epoch))
    CASES("broker Publish (bad header/body)")
    out = call_raw(broker.channel, SVC + "Publish", "su", msgs, md("learner"))
    assert_clear(out, ok=False, what=msgs[:1])


def _header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=8),
                         st.floats(allow_nan=True, allow_infinity=True))
TENSOR_ENTRY = st.one_of(
    JSON_SCALARS, st.lists(JSON_SCALARS, max_size=3),
    st.fixed_dictionaries({}, optional={
        "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I8", "Q4"]), JSON_SCALARS,
                           st.lists(JSON_SCALARS, max_size=2)),
        "shape": st.one_of(st.lists(st.one_of(st.integers(-2, 2**40), JSON_SCALARS), max_size=3), JSON_SCALARS),
        "data_offsets": st.one_of(st.lists(st.one_of(st.integers(-2, 2**40), JSON_SCALARS), max_size=3),
                                  JSON_SCALARS)}),
)
HEADERS = st.dictionaries(st.one_of(st.sampled_from([
    "__metadata__", "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]), st.text(max_size=12)),
    TENSOR_ENTRY, max_size=4)
BAD_CONFIGS = st.fixed_dictionaries({}, optional={
    "r": st.one_of(st.sampled_from([0, -1, 8, 2**70, "4", 4.0, None, True, [4]]), JSON_SCALARS),
    "lora_alpha": st.sampled_from(["x", None, [1], float("nan"), float("inf"), float("-inf")]),
    "target_modules": st.sampled_from([5, [], ["k_proj"], [1, 2], "(", "[", "k_proj", {"a": 1}]),
    "peft_type": st.sampled_from(["IA3", 5, None]),
    "use_dora": st.just(True),
    "rank_pattern": st.sampled_from([[1], 5, "x", {"q_proj": [4]}, {"q_proj": "4"}, {"q_proj": -1}]),
}).filter(bool)


@st.composite
def bad_adapter(draw):
    """A real adapter's bytes with its header replaced, or its config made wrong; the declared
    size and sha256 are the true ones, so only the content checks can refuse it."""
    base_config, data = make_adapter(seed=99)
    n = _header_len(data)
    how = draw(st.sampled_from(["header json", "header length", "config", "truncated header"]))
    cfg = dict(base_config)
    if how == "header json":
        new = json.dumps(draw(HEADERS)).encode()
        data = struct.pack("<Q", len(new)) + new + data[8 + n:]
    elif how == "header length":
        k = draw(st.one_of(st.sampled_from([0, 1, 2**63, 2**64 - 1, n - 1, n + 1, 100_000_001]),
                           st.integers(0, 2**64 - 1)))
        assume(k != n)
        data = struct.pack("<Q", k) + data[8:]
    elif how == "truncated header":
        data = data[: draw(st.integers(0, 8 + n - 1))]
    else:
        cfg.update(draw(BAD_CONFIGS))
    return cfg, data


@bounded(120)
@given(data=st.data())
def test_publish_of_an_adapter_that_does_not_check(broker, unchanged, data):
    cfg, body = data.draw(bad_adapter())
    CASES("broker Publish (bad adapter)")
    header = pb.PublishHeader(name=NAME, epoch=broker.epoch, base_model_fingerprint=FP,
                              adapter_config_json=json.dumps(cfg), size_bytes=len(body),
                              sha256=hashlib.sha256(body).hexdigest())
    msgs = [pb.PublishRequest(header=header).SerializeToString()]
    msgs += [pb.PublishRequest(chunk=body[i:i + 1024]).SerializeToString() for i in range(0, len(body), 1024)]
    out = call_raw(broker.channel, SVC + "Publish", "su", msgs, md("learner"))
    assert_clear(out, ok=False, what=(cfg, body[:80]))


def test_oversized_messages_are_refused(broker, unchanged):
    """A message past the server's 16 MiB limit, and an upload past max_adapter_bytes."""
    big = pb.PublishRequest(chunk=b"\0" * (17 << 20)).SerializeToString()
    h = pb.PublishRequest(header=pb.PublishHeader(
        name=NAME, epoch=broker.epoch, base_model_fingerprint=FP, adapter_config_json=json.dumps(broker.config),
        size_bytes=MAX_ADAPTER, sha256="0" * 64)).SerializeToString()
    out = call_raw(broker.channel, SVC + "Publish", "su", [h, big], md("learner"), timeout=30)
    assert_clear(out, {grpc.StatusCode.RESOURCE_EXHAUSTED}, ok=False)
    out = call_raw(broker.channel, SVC + "GetAdapter", "uu", b"\x0a" + b"\xff" * 4 + b"\x01" + b"a" * (17 << 20),
                   md("client"))
    assert_clear(out, {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT}, ok=False)
    # declared within the limit, then more bytes than declared
    small = pb.PublishRequest(header=pb.PublishHeader(
        name=NAME, epoch=broker.epoch, base_model_fingerprint=FP, adapter_config_json=json.dumps(broker.config),
        size_bytes=1024, sha256="0" * 64)).SerializeToString()
    out = call_raw(broker.channel, SVC + "Publish", "su", [small, pb.PublishRequest(chunk=b"\1" * 4096).SerializeToString()],
                   md("learner"))
    assert_clear(out, {grpc.StatusCode.INVALID_ARGUMENT}, ok=False)
    CASES("broker Publish (oversized)", 2)
    CASES("broker GetAdapter (oversized)")


# ------------------------------------------------------------------ the read side and pins


VERSIONS = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 99, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))


@bounded(120)
@given(method=st.sampled_from(["GetAdapter", "Fetch", "Pin", "Unpin", "ListVersions"]),
       name=st.one_of(st.just(NAME), NAMES), version=VERSIONS,
       chunk_bytes=st.sampled_from([0, 1, 7, 4096, 2**20, 2**32 - 1]))
def test_reads_and_pins_of_any_reference(broker, unchanged, method, name, version, chunk_bytes):
    live = name == NAME and version in (0, 2, 3)
    assume(not (live and method in ("Pin", "Unpin")))  # a valid pin changes state, legitimately
    CASES(f"broker {method}")
    ref = pb.AdapterRef(name=name, version=version)
    req = {"GetAdapter": pb.GetAdapterRequest(ref=ref), "Fetch": pb.FetchRequest(ref=ref, chunk_bytes=chunk_bytes),
           "Pin": pb.PinRequest(ref=ref), "Unpin": pb.PinRequest(ref=ref),
           "ListVersions": pb.ListVersionsRequest(name=name)}[method]
    kind, role = METHODS[method]
    out = call_raw(broker.channel, SVC + method, kind, req.SerializeToString(), md(role))
    valid_name = bool(NAME_RE.fullmatch(name)) and ".." not in name
    if method == "ListVersions":
        assert_clear(out, ok=valid_name, what=name)
        return
    if not valid_name:
        assert_clear(out, {grpc.StatusCode.INVALID_ARGUMENT}, ok=False, what=name)
    elif live:
        assert_clear(out, what=(name, version))
        assert out.code == grpc.StatusCode.OK, out
        if method == "Fetch":
            record = pb.FetchResponse.FromString(out.responses[0]).record
            body = b"".join(pb.FetchResponse.FromString(r).chunk for r in out.responses[1:])
            assert hashlib.sha256(body).hexdigest() == record.sha256 and len(body) == record.size_bytes
            if chunk_bytes:  # held to at least 4 KiB a message: 1-byte chunks would be one message a byte
                assert len(out.responses) - 1 <= -(-record.size_bytes // max(chunk_bytes, 4096))
    else:  # retired (v1), never published, or a name with no versions
        assert_clear(out, {grpc.StatusCode.NOT_FOUND}, ok=False, what=(name, version))


@bounded(40)
@given(watch=st.lists(st.tuples(st.one_of(st.just(NAME), NAMES), VERSIONS), max_size=4),
       include_staged=st.booleans())
def test_watch_of_any_names(broker, unchanged, watch, include_staged):
    """Bad names, or a name given twice: INVALID_ARGUMENT. Valid ones: the history after
    `after_version` replays (read one event, then the client cancels: a stream cut off mid-way),
    or the watch waits."""
    CASES("broker Watch")
    req = pb.WatchRequest(adapters=[pb.WatchFrom(name=n, after_version=v) for n, v in watch],
                          include_staged=include_staged)
    names_ok = (bool(watch) and len({n for n, _ in watch}) == len(watch)
                and all(NAME_RE.fullmatch(n) and ".." not in n for n, _ in watch))
    replays = names_ok and dict(watch).get(NAME, 3) < 3
    out = call_raw(broker.channel, SVC + "Watch", "us", req.SerializeToString(), md("rollout"),
                   timeout=0.5 if names_ok and not replays else 10.0, first_only=True)
    if not names_ok:
        assert_clear(out, {grpc.StatusCode.INVALID_ARGUMENT}, ok=False, what=watch)
        return
    if replays:
        assert out.code == grpc.StatusCode.OK and out.responses, out
        ev = pb.AdapterEvent.FromString(out.responses[0])
        assert ev.record.name == NAME and ev.record.version >= 1  # retired versions are history too
    else:
        assert out.code == grpc.StatusCode.DEADLINE_EXCEEDED, out  # nothing to say yet: it waits


@bounded(40)
@given(sha=st.one_of(SHAS, st.text(max_size=80)), role=st.sampled_from(["rollout", "client", "learner"]))
def test_fetch_staged_of_anything(broker, unchanged, sha, role):
    CASES("broker FetchStaged")
    out = call_raw(broker.channel, SVC + "FetchStaged", "us", pb.FetchStagedRequest(sha256=sha).SerializeToString(),
                   md(role))
    allowed = {grpc.StatusCode.NOT_FOUND} if role == "rollout" else {grpc.StatusCode.PERMISSION_DENIED}
    assert_clear(out, allowed, ok=False, what=sha)


def test_many_names_in_one_watch_and_slow_readers(broker, unchanged):
    """A watch of 2,000 names answers; a fetch read slowly (bounded) completes; a watch and a
    fetch cut off after their first message leave the broker serving."""
    many = pb.WatchRequest(adapters=[pb.WatchFrom(name=f"n{i}") for i in range(1999)] + [pb.WatchFrom(name=NAME)])
    t0 = time.monotonic()
    out = call_raw(broker.channel, SVC + "Watch", "us", many.SerializeToString(), md("rollout"), timeout=20,
                   first_only=True)
    assert out.code == grpc.StatusCode.OK and out.responses, out
    assert time.monotonic() - t0 < 15
    call = broker.channel.unary_stream(SVC + "Fetch", request_serializer=lambda b: b, response_deserializer=lambda b: b)(
        pb.FetchRequest(ref=pb.AdapterRef(name=NAME), chunk_bytes=4096).SerializeToString(),
        metadata=md("client"), timeout=30)
    got = []
    for r in call:
        got.append(pb.FetchResponse.FromString(r))
        time.sleep(0.1)  # a slow reader: the stream waits for it
    body = b"".join(r.chunk for r in got[1:])
    assert hashlib.sha256(body).hexdigest() == got[0].record.sha256
    cut = broker.channel.unary_stream(SVC + "Fetch", request_serializer=lambda b: b, response_deserializer=lambda b: b)(
        pb.FetchRequest(ref=pb.AdapterRef(name=NAME), chunk_bytes=4096).SerializeToString(),
        metadata=md("client"), timeout=30)
    next(cut)
    cut.cancel()
    CASES("broker Watch (2,000 names)")
    CASES("broker Fetch (slow reader, cut off)", 2)


def test_a_good_publish_still_commits(broker):
    """After all the above, the next publish gets the next version (v4): nothing was used up."""
    with BrokerClient(broker.proc.target, TOKENS["learner"]) as c:
        config, data = make_adapter(seed=7)
        rec, dedup = c.publish_bytes(NAME, broker.epoch, config, data, FP)
        assert rec.version == 4 and not dedup
        assert c.fetch(f"{NAME}@v4")[1] == data
    assert broker.redis.client().keys("ll:staging:*") == []

