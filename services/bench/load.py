"""`loraloop bench load`: one tiny-model replica and the broker held under load (issue 19).

Real servers on 127.0.0.1, started here and stopped by pid: redis-server (AOF, fsync always),
the broker, and one `loraloop rollout` replica (the vLLM CPU engine and its OpenAI HTTP front)
with two adapters published (`a0`, `a1`). Two parts, in one run:

1. Serving: `--grpc-streams` (512) concurrent Generate streams and `--openai-streams` (256)
   concurrent streaming requests of the official `openai` client (AsyncOpenAI, completions and
   chat in turn) for `--seconds`, each stream a loop of requests asking in turn for the base,
   `a0` and `a1@latest`; every response must name the version asked for and end with
   finish_reason stop/length. The load runs in two client processes of its own (one per API),
   on the cores the engine is not bound to.
2. Publishes: `--publishes` (10,000) versions of one name, each a distinct small adapter, from
   one client process (two in turn: Redis is read after the first half too), with the broker's
   retention on (registry.keep_last, its default).

Figures: requests done, errors by status (a clean, retryable shed -- gRPC RESOURCE_EXHAUSTED or
UNAVAILABLE, HTTP 429 or 503 -- counted apart from failures), p50/p99 latency and time to
first token, peak RSS of each server's process tree, open file descriptors and threads of
each tree before and after (after `--settle-s` with the clients gone: the leak verdict),
publish rate, and Redis's used_memory after retention against the memory Redis held before
the publishes + keep_last x adapter size + a fixed overhead allowance (records, the event
stream's events_maxlen entries, publish_ids_kept ids), with what it is made of (key families)
and its growth per publish from the first half to the end.

Goals: 0 errors; no fd or thread growth past the slack; Redis within that bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from services.bench import emit, listdir, percentile, read_lines, tree_pids

SHED = {"grpc": ("RESOURCE_EXHAUSTED", "UNAVAILABLE"), "openai": ("http_429", "http_503"), "publish": (
    "RESOURCE_EXHAUSTED", "UNAVAILABLE")}
"""Statuses that mean "the server shed this request, retry it": counted apart from failures."""
ADAPTERS = ("a0", "a1")
PUB_NAME = "load-pub"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="loraloop bench load", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Holds one tiny-model rollout replica under concurrent gRPC Generate streams and "
                    "OpenAI streaming requests, then the broker under many publishes with retention on; "
                    "prints errors, latency, peak RSS, fds/threads before and after, Redis memory against "
                    "its bound. Starts (and stops, by pid) every server it needs, on 127.0.0.1.")
    p.add_argument("--out", type=Path, help="write every figure to this JSON file")
    p.add_argument("--parts", default="serving,publish", help="which parts to run: serving, publish or both")
    p.add_argument("--seconds", type=float, default=60.0,
                   help="how long the serving load starts new requests (in-flight ones then finish)")
    p.add_argument("--grpc-streams", type=int, default=512, help="concurrent Generate streams")
    p.add_argument("--grpc-channels", type=int, default=8, help="gRPC connections the streams are spread over")
    p.add_argument("--openai-streams", type=int, default=256, help="concurrent OpenAI streaming requests")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per request (ignore_eos: all generated)")
    p.add_argument("--request-timeout-s", type=float, default=300.0, help="a request taking longer fails")
    p.add_argument("--max-num-seqs", type=int, default=64, help="the engine's batch (engine.max_num_seqs)")
    p.add_argument("--publishes", type=int, default=10_000, help="versions published to one name")
    p.add_argument("--adapter-bytes", type=int, default=16_384, help="size of each published adapter (about)")
    p.add_argument("--settle-s", type=float, default=10.0,
                   help="wait after a part's clients exit before the 'after' reading of fds and threads")
    p.add_argument("--fd-slack", type=int, default=8, help="fds a server tree may gain without a leak verdict")
    p.add_argument("--thread-slack", type=int, default=4,
                   help="threads a server tree may gain without a leak verdict")
    p.add_argument("--cpu-bind", default="0", help="VLLM_CPU_OMP_THREADS_BIND for the replica's engine")
    p.add_argument("--client-cpus", default="",
                   help="CPUs for the client processes, e.g. '1' ('' = every CPU but the engine's, "
                        "all where that leaves none)")
    p.add_argument("--work-dir", type=Path,
                   help="keep the servers' and clients' logs here (default: a temp dir, removed at the end)")
    p.add_argument("--quick", action="store_true", help="16 + 8 streams for 8 s, 200 publishes (a smoke run)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return a
    if a.quick:
        a.grpc_streams, a.openai_streams, a.seconds, a.publishes, a.settle_s = 16, 8, 8.0, 200, 3.0
    a.parts = [x for x in a.parts.split(",") if x]
    if not a.parts or set(a.parts) - {"serving", "publish"}:
        p.error("--parts: serving, publish, or serving,publish")
    if min(a.grpc_streams, a.openai_streams, a.grpc_channels, a.max_tokens, a.publishes) < 1 or a.seconds <= 0:
        p.error("stream counts, channels, max-tokens and publishes must be >= 1; seconds > 0")
    if a.adapter_bytes < 1024:
        p.error("--adapter-bytes: at least 1024")
    a.client_cpus = client_cpus(a.client_cpus, a.cpu_bind, sorted(os.sched_getaffinity(0)))
    return a


def client_cpus(given: str, engine_bind: str, usable: list[int]) -> list[int]:
    """The CPUs the client processes run on: `given` ("1", "0,2-3"), else every usable CPU
    the engine is not bound to (all of them where the engine's binding leaves none)."""
    if given:
        return parse_cpus(given)
    taken = set(parse_cpus(engine_bind)) if engine_bind not in ("auto", "nobind", "all") else set()
    return [c for c in usable if c not in taken] or list(usable)


def parse_cpus(text: str) -> list[int]:
    out: list[int] = []
    for part in text.replace("|", ",").split(","):
        lo, _, hi = part.strip().partition("-")
        if lo:
            out += range(int(lo), int(hi or lo) + 1)
    return out


# ------------------------------------------------------------------ tallies (pure)


@dataclass
class Tally:
    """What one client process saw: outcome -> count ("ok" or a status), and per ok request
    its latency and time to first token."""

    outcomes: Counter = field(default_factory=Counter)
    latency_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    tokens: int = 0
    examples: dict[str, str] = field(default_factory=dict)  # outcome -> its first message
    seconds: float = 0.0

    def fail(self, outcome: str, message: str) -> None:
        self.outcomes[outcome] += 1
        self.examples.setdefault(outcome, message[:300])

    def ok(self, latency: float, ttft: float | None, tokens: int) -> None:
        self.outcomes["ok"] += 1
        self.latency_s.append(latency)
        if ttft is not None:
            self.ttft_s.append(ttft)
        self.tokens += tokens

    def to_json(self) -> dict:
        return {"outcomes": dict(self.outcomes), "latency_s": self.latency_s, "ttft_s": self.ttft_s,
                "tokens": self.tokens, "examples": self.examples, "seconds": self.seconds}


def summarize(t: dict, shed_codes: tuple[str, ...]) -> dict:
    """A client's tally (Tally.to_json) as figures: requests, ok, shed and errors by status,
    requests/s, p50/p99 latency and TTFT (ms, ok requests)."""
    out = Counter(t["outcomes"])
    shed = {k: v for k, v in out.items() if k in shed_codes}
    errors = {k: v for k, v in out.items() if k != "ok" and k not in shed_codes}

    def ms(xs: list[float], q: int) -> float | None:
        return 1000 * percentile(xs, q) if xs else None

    requests = sum(out.values())
    return {"requests": requests, "ok": out["ok"], "shed": shed, "shed_total": sum(shed.values()),
            "errors": errors, "errors_total": sum(errors.values()), "seconds": t["seconds"],
            "requests_per_s": requests / t["seconds"] if t["seconds"] else 0.0,
            "tokens": t["tokens"], "tokens_per_s": t["tokens"] / t["seconds"] if t["seconds"] else 0.0,
            "latency_ms_p50": ms(t["latency_s"], 50), "latency_ms_p99": ms(t["latency_s"], 99),
            "ttft_ms_p50": ms(t["ttft_s"], 50), "ttft_ms_p99": ms(t["ttft_s"], 99),
            "examples": {k: v for k, v in t["examples"].items() if k != "ok"}}


def leak_verdict(before: dict, after: dict, fd_slack: int, thread_slack: int) -> dict:
    """Growth of a server tree's fds and threads from `before` to `after` (proc_reading) and
    whether either grew past its slack."""
    fds, threads = after["fds"] - before["fds"], after["threads"] - before["threads"]
    leak = [what for what, grew, slack in (("fds", fds, fd_slack), ("threads", threads, thread_slack))
            if grew > slack]
    return {"fds_delta": fds, "threads_delta": threads, "rss_mb_delta": after["rss_mb"] - before["rss_mb"],
            "leak": leak, "verdict": "LEAK: " + ", ".join(leak) + " grew" if leak else "no leak"}


# What the broker keeps beyond the adapter bytes, as fixed allowances (services/broker/scripts.py):
# per kept version its JSON record (~0.6 KB) and the keys of its record and blob; per event kept
# (registry.events_maxlen) a stream entry holding the record (~0.7 KB); per publish id kept
# (registry.publish_ids_kept) a zset member (~0.1 KB). None grows with the number of publishes.
PER_VERSION_ALLOWANCE, PER_EVENT_ALLOWANCE, PER_PUBLISH_ID_ALLOWANCE = 2048, 1024, 128


def redis_bound(baseline_bytes: int, keep_last: int, adapter_bytes: int, used_bytes: int, publishes: int,
                events_maxlen: int, publish_ids_kept: int, used_half_bytes: int | None = None,
                half_publishes: int = 0, stats_bytes: int = 0) -> dict:
    """Redis's used_memory after retention against the bound: what Redis held before the publishes
    + keep_last x adapter size + an overhead that does not depend on the number of publishes (the
    allowances above, for keep_last versions, events_maxlen events and publish_ids_kept ids, and
    `stats_bytes`: Redis's own per-command statistics, one latency histogram per command name
    with `latency-tracking yes`, Redis 7's default, measured as what CONFIG RESETSTAT frees).
    `used_half_bytes`, read after the first `half_publishes`, gives the growth per publish over
    the rest: ~0 when nothing grows with their number."""
    overhead = (keep_last * PER_VERSION_ALLOWANCE + events_maxlen * PER_EVENT_ALLOWANCE
                + publish_ids_kept * PER_PUBLISH_ID_ALLOWANCE + stats_bytes)
    bound = baseline_bytes + keep_last * adapter_bytes + overhead
    later = publishes - half_publishes
    growth = (used_bytes - used_half_bytes) / later if used_half_bytes is not None and later > 0 else None
    return {"baseline_bytes": baseline_bytes, "keep_last": keep_last, "adapter_bytes": adapter_bytes,
            "events_maxlen": events_maxlen, "publish_ids_kept": publish_ids_kept,
            "overhead_allowance_bytes": overhead, "bound_bytes": bound, "used_bytes": used_bytes,
            "overhead_bytes": used_bytes - baseline_bytes - keep_last * adapter_bytes,
            "ratio": used_bytes / bound, "within_bound": used_bytes <= bound,
            "excess_bytes_per_publish": max(0, used_bytes - bound) / publishes if publishes else 0.0,
            "used_half_bytes": used_half_bytes, "half_publishes": half_publishes, "stats_bytes": stats_bytes,
            "growth_bytes_per_publish": growth}


def key_family(key: str) -> str:
    """The broker's Redis keys grouped by what they hold (services.broker.registry's layout)."""
    if key.startswith("ll:blob:"):
        return "blobs (adapter bytes)"
    if key.startswith("ll:blobref:"):
        return "blob refcounts"
    if key.startswith("ll:staging:"):
        return "staging"
    if key.startswith("ll:a:"):
        rest = key[len("ll:a:"):]
        for suffix, family in ((":events", "event streams"), (":versions", "version sets"),
                               (":pinned", "pinned sets"), (":pubids", "publish ids")):
            if rest.endswith(suffix):
                return family
        if ":v:" in rest:
            return "version records"
        return "name heads"
    return "other"


# ------------------------------------------------------------------ process trees


def proc_reading(root: int) -> dict:
    """RSS (MB), open fds and threads of `root`'s process tree, summed, and its process count."""
    rss_kb = threads = fds = 0
    pids = tree_pids(root)
    for pid in pids:
        for line in read_lines(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                rss_kb += int(line.split()[1])
            elif line.startswith("Threads:"):
                threads += int(line.split()[1])
        fds += len(listdir(f"/proc/{pid}/fd"))
    return {"procs": len(pids), "rss_mb": rss_kb / 1024, "fds": fds, "threads": threads}


# ------------------------------------------------------------------ client processes


def prompt_ids(k: int) -> list[int]:
    from services.bench.rollout import prompt

    return prompt(k)


async def grpc_load(spec: dict) -> Tally:
    """`streams` loops of Generate over `channels` connections until `seconds` have passed."""
    import grpc

    from loraloop.v1 import rollout_pb2 as pb
    from loraloop.v1 import rollout_pb2_grpc as pbg

    channels = [grpc.aio.insecure_channel(spec["target"], options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(spec["channels"])]
    stubs = [pbg.RolloutStub(c) for c in channels]
    md = (("authorization", f"Bearer {spec['token']}"),)
    kinds, streams, tally = spec["kinds"], spec["streams"], Tally()

    async def one(k: int) -> None:
        adapter = kinds[k % len(kinds)]
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt_ids(k)), adapter=adapter, params=pb.SamplingParams(
            max_tokens=spec["max_tokens"], temperature=1.0, ignore_eos=True))
        t0 = time.perf_counter()
        first, tokens, names, finish = None, 0, set(), None
        try:
            async for m in stubs[k % len(stubs)].Generate(req, metadata=md, timeout=spec["timeout_s"]):
                if m.token_ids and first is None:
                    first = time.perf_counter() - t0
                tokens += len(m.token_ids)
                names.add(m.adapter_name)
                if m.finished:
                    finish = m.finish_reason
        except grpc.aio.AioRpcError as e:
            tally.fail(e.code().name, f"{adapter or 'base'}: {e.details()}")
            return
        want = adapter.split("@")[0]
        if names != {want}:
            tally.fail("wrong_adapter", f"asked {adapter!r}, served {sorted(names)}")
        elif finish not in ("stop", "length"):
            tally.fail(f"finish_{finish}", f"{adapter or 'base'}: stream ended with finish_reason {finish!r}")
        else:
            tally.ok(time.perf_counter() - t0, first, tokens)

    tally.seconds = await _loops(one, streams, spec["seconds"], tally)
    for c in channels:
        await c.close()
    return tally


async def openai_load(spec: dict) -> Tally:
    """`streams` loops of streaming completions and chat completions (official client)."""
    from openai import APIConnectionError, APIStatusError, APITimeoutError, AsyncOpenAI

    client = AsyncOpenAI(base_url=spec["url"], api_key=spec["token"], max_retries=0, timeout=spec["timeout_s"])
    kinds, base, tally = spec["kinds"], spec["base"], Tally()

    async def one(k: int) -> None:
        model = kinds[k % len(kinds)] or base
        a, b = k % 10, (k // 10) % 10
        opts = {"stream": True, "stream_options": {"include_usage": True}, "max_tokens": spec["max_tokens"],
                "temperature": 1.0, "extra_body": {"ignore_eos": True}}
        t0 = time.perf_counter()
        first, tokens, models, finish = None, 0, set(), None
        try:
            if (k // len(kinds)) % 2:
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": f"{a}+{b}="}], **opts)
            else:
                stream = await client.completions.create(model=model, prompt=f"{a}+{b}=", **opts)
            async for chunk in stream:
                models.add(chunk.model)
                if chunk.choices:
                    if first is None:
                        first = time.perf_counter() - t0
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens or 0
        except APIStatusError as e:
            tally.fail(f"http_{e.status_code}", f"{model}: {e.message}")
            return
        except APITimeoutError as e:
            tally.fail("timeout", f"{model}: {e}")
            return
        except APIConnectionError as e:
            tally.fail("connection_error", f"{model}: {e!r} ({e.__cause__!r})")
            return
        want = model if model == base else model.split("@")[0] + "@v"
        if len(models) != 1 or not (models == {base} if model == base else next(iter(models)).startswith(want)):
            tally.fail("wrong_model", f"asked {model!r}, served {sorted(models)}")
        elif finish not in ("stop", "length"):
            tally.fail(f"finish_{finish}", f"{model}: finish_reason {finish!r}")
        else:
            tally.ok(time.perf_counter() - t0, first, tokens)

    tally.seconds = await _loops(one, spec["streams"], spec["seconds"], tally)
    await client.close()
    return tally


async def _loops(one, streams: int, seconds: float, tally: Tally) -> float:
    """`streams` concurrent loops of `one(k)` (k = the request's number) that start no request
    after `seconds`; an exception `one` did not classify is counted by its type."""
    stop = time.monotonic() + seconds

    async def loop(i: int) -> None:
        k = i
        while time.monotonic() < stop:
            try:
                await one(k)
            except Exception as e:  # every request is counted, whatever ended it
                tally.fail(type(e).__name__, repr(e))
            k += streams

    t0 = time.monotonic()
    await asyncio.gather(*(loop(i) for i in range(streams)))
    return time.monotonic() - t0


def publish_load(spec: dict) -> Tally:
    """`publishes` distinct adapters of ~`adapter_bytes`, one after another, to one name
    (no client-side retries: a shed publish is counted, not hidden)."""
    from services.bench.broker import FINGERPRINT, make_adapter
    from services.broker.client import BrokerClient
    from services.common.errors import LoraloopError
    from services.common.status import code_name

    tally = Tally()
    t0 = time.monotonic()
    with BrokerClient(spec["target"], spec["token"], retries=0) as c:
        epoch, _ = c.acquire_publisher(spec["name"])
        for i in range(spec.get("first", 0), spec.get("first", 0) + spec["publishes"]):
            config, data = make_adapter(spec["adapter_bytes"], seed=i, rank=4)
            t = time.perf_counter()
            try:
                c.publish_bytes(spec["name"], epoch, config, data, FINGERPRINT, learner_step=i)
            except LoraloopError as e:
                tally.fail(code_name(e), str(e))
                continue
            tally.ok(time.perf_counter() - t, None, len(data))
    tally.seconds = time.monotonic() - t0
    return tally


def worker(spec: dict) -> None:
    if spec.get("cpus"):
        os.sched_setaffinity(0, spec["cpus"])
    if spec["kind"] == "grpc":
        tally = asyncio.run(grpc_load(spec))
    elif spec["kind"] == "openai":
        tally = asyncio.run(openai_load(spec))
    else:
        tally = publish_load(spec)
    Path(spec["out"]).write_text(json.dumps(tally.to_json()))


def spawn(spec: dict, work: Path) -> subprocess.Popen:
    """A client process (`--worker`): one thread for OpenMP-backed libraries, its output to a log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GRPC_ENABLE_FORK_SUPPORT": "0"}
    with open(work / f"client-{spec['kind']}.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "services.bench.load", "--worker", json.dumps(spec)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)


def join(procs: dict[str, subprocess.Popen], specs: dict[str, dict], work: Path, timeout_s: float) -> dict[str, dict]:
    """Wait for the client processes; each one's tally (or SystemExit with its log tail).
    Whatever happens (a timeout, one failing, Ctrl-C), none is left running."""
    from services.common.proc import stop_process

    out = {}
    deadline = time.monotonic() + timeout_s
    try:
        for kind, proc in procs.items():
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stop_process(proc)
            if proc.returncode != 0 or not Path(specs[kind]["out"]).exists():
                log = (work / f"client-{kind}.log").read_text()[-3000:]
                raise SystemExit(f"the {kind} client process failed (exit {proc.returncode}):\n{log}")
            out[kind] = json.loads(Path(specs[kind]["out"]).read_text())
    finally:
        for proc in procs.values():
            stop_process(proc)
    return out


# ------------------------------------------------------------------ servers


class Servers:
    """The servers under load by name -> pid, sampled for peak tree RSS while a part runs."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def readings(self) -> dict[str, dict]:
        return {n: proc_reading(p) for n, p in self.pids.items()}

    def trace(self) -> RssTrace:
        return RssTrace(self.pids)


class RssTrace:
    """Each server tree's RSS every `every_s` on a thread, until `stop()`: its peak, and its RSS
    at each quarter of the window (growth that levels off is caches filling; growth that
    keeps on is what a leak looks like)."""

    def __init__(self, pids: dict[str, int], every_s: float = 0.5) -> None:
        import threading

        self.pids, self.every_s = pids, every_s
        self.samples: dict[str, list[tuple[float, float]]] = {n: [] for n in pids}
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-trace")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for n, pid in self.pids.items():
                self.samples[n].append((time.monotonic() - self._t0, proc_reading(pid)["rss_mb"]))
            self._stop.wait(self.every_s)

    def stop(self) -> dict[str, dict]:
        self._stop.set()
        self._thread.join()
        return {n: rss_profile(s) for n, s in self.samples.items()}


def rss_profile(samples: list[tuple[float, float]]) -> dict:
    """Peak RSS (MB) of (seconds, MB) samples and the RSS at 25/50/75/100% of their window."""
    if not samples:
        return {"peak_rss_mb": 0.0, "rss_mb_quarters": []}
    end = samples[-1][0]
    quarters = [next(mb for t, mb in samples if t >= q * end) for q in (0.25, 0.5, 0.75, 1.0)]
    return {"peak_rss_mb": max(mb for _, mb in samples), "rss_mb_quarters": quarters}


def start_replica(model: Path, broker: str, tokens: dict[str, str], work: Path, args: argparse.Namespace):
    """`loraloop rollout` with its HTTP front; (process, gRPC target, OpenAI base URL)."""
    from services.bench.serving import _wait_http
    from services.common.net import free_port

    port, http = free_port(), free_port()
    env = {**os.environ, "LORALOOP_TOKENS": ",".join(f"{r}:{t}" for r, t in tokens.items()),
           "LORALOOP_TOKEN": tokens["rollout"], "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": args.cpu_bind}
    log = work / "rollout.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "rollout", "--port", str(port), "--model", str(model),
             f"--broker={broker}", f"--adapters.dir={work / 'cache'}", f"--http.port={http}",
             "--log_level=WARNING", "--server.grace_s=1", "--http.grace_s=1", "--engine.dtype=float32",
             "--engine.max_model_len=128", f"--engine.max_num_seqs={args.max_num_seqs}",
             "--engine.max_lora_rank=16", "--engine.max_loras=4"],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    _wait_http(f"http://127.0.0.1:{http}/health", proc, log)
    return proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{http}/v1"


def warm_up(target: str, url: str, token: str, base: str) -> None:
    """One request of each kind over each API, from this process, its connections then closed:
    adapters loaded and lazy pools started before the 'before' reading."""
    import grpc

    from loraloop.v1 import rollout_pb2 as pb
    from loraloop.v1 import rollout_pb2_grpc as pbg

    md = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(target) as ch:
        stub = pbg.RolloutStub(ch)
        for k, adapter in enumerate(("", *ADAPTERS)):
            list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt_ids(k)), adapter=adapter,
                                                  params=pb.SamplingParams(max_tokens=2)), metadata=md, timeout=120))
    from openai import OpenAI

    with OpenAI(base_url=url, api_key=token, max_retries=0, timeout=120) as c:
        for model in (base, *ADAPTERS):
            c.completions.create(model=model, prompt="1+2=", max_tokens=2)
            c.chat.completions.create(model=model, messages=[{"role": "user", "content": "1+2="}], max_tokens=2)


# ------------------------------------------------------------------ parts


def serving_part(args: argparse.Namespace, work: Path, servers: Servers, target: str, url: str,
                 token: str, base: str) -> dict:
    kinds = ["", *ADAPTERS[:1], f"{ADAPTERS[1]}@latest"]
    common = {"seconds": args.seconds, "max_tokens": args.max_tokens, "timeout_s": args.request_timeout_s,
              "token": token, "kinds": kinds, "cpus": args.client_cpus}
    specs = {"grpc": {**common, "kind": "grpc", "target": target, "streams": args.grpc_streams,
                      "channels": args.grpc_channels, "out": str(work / "grpc.json")},
             "openai": {**common, "kind": "openai", "url": url, "base": base, "streams": args.openai_streams,
                        "out": str(work / "openai.json")}}
    warm_up(target, url, token, base)
    time.sleep(2)
    before = servers.readings()
    trace = servers.trace()
    print(f"serving: {args.grpc_streams} gRPC Generate streams + {args.openai_streams} OpenAI streams for "
          f"{args.seconds:.0f} s ...", flush=True)
    t0 = time.monotonic()
    tallies = join({k: spawn(s, work) for k, s in specs.items()}, specs, work,
                   args.seconds + args.request_timeout_s + 120)
    wall = time.monotonic() - t0
    rss = trace.stop()
    time.sleep(args.settle_s)
    return {"wall_s": wall, "engine_max_num_seqs": args.max_num_seqs,
            "grpc": summarize(tallies["grpc"], SHED["grpc"]), "openai": summarize(tallies["openai"], SHED["openai"]),
            "servers": server_figures(before, servers.readings(), rss, args)}


def server_figures(before: dict, after: dict, rss: dict, args: argparse.Namespace) -> dict:
    return {n: {"before": before[n], "after": after[n], **rss[n],
                **leak_verdict(before[n], after[n], args.fd_slack, args.thread_slack)} for n in before}


def history_figures(events: int, events_bytes: int, pub_ids: dict, events_maxlen: int, ids_kept: int,
                    ttl_s: int) -> dict:
    """What the broker keeps of the publishes' history (services/broker/scripts.py's commit): the
    event stream (the newest events_maxlen records, for watch replays) and the publish ids (the
    newest publish_ids_kept, for retried publishes; forgotten publish_id_ttl_s after the last)."""
    return {"events": events, "events_bytes": events_bytes,
            "bytes_per_event": events_bytes / events if events else 0.0, "events_maxlen": events_maxlen,
            "publish_ids": pub_ids["members"], "publish_ids_bytes": pub_ids["bytes"],
            "bytes_per_publish_id": pub_ids["bytes"] / pub_ids["members"] if pub_ids["members"] else 0.0,
            "publish_ids_kept": ids_kept, "publish_id_ttl_s": ttl_s}


def merge_tallies(a: dict, b: dict) -> dict:
    """Two client tallies (Tally.to_json) of one kind as one."""
    return {"outcomes": dict(Counter(a["outcomes"]) + Counter(b["outcomes"])),
            "latency_s": a["latency_s"] + b["latency_s"], "ttft_s": a["ttft_s"] + b["ttft_s"],
            "tokens": a["tokens"] + b["tokens"], "examples": {**b["examples"], **a["examples"]},
            "seconds": a["seconds"] + b["seconds"]}


def purge(r) -> None:
    """MEMORY PURGE (jemalloc returns dirty pages), so used_memory is read after it; a Redis
    built without jemalloc refuses it, and that is fine."""
    import redis

    with contextlib.suppress(redis.ResponseError):
        r.memory_purge()


def redis_families(r) -> dict[str, dict]:
    """Keys and bytes (MEMORY USAGE) per key family."""
    fams: dict[str, dict] = {}
    keys = list(r.scan_iter(count=1000))
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.memory_usage(k, samples=0)
    for k, used in zip(keys, pipe.execute(), strict=True):
        f = fams.setdefault(key_family(k.decode()), {"keys": 0, "bytes": 0})
        f["keys"] += 1
        f["bytes"] += used or 0
    return fams


def publish_part(args: argparse.Namespace, work: Path, servers: Servers, broker: str, redis_url: str,
                 tokens: dict[str, str]) -> dict:
    import redis

    from services.bench.broker import make_adapter
    from services.broker.client import BrokerClient
    from services.broker.config import RegistryConfig

    reg = RegistryConfig()  # the broker runs on its defaults
    keep_last = reg.keep_last
    adapter_bytes = len(make_adapter(args.adapter_bytes, seed=0, rank=4)[1])
    r = redis.Redis.from_url(redis_url)
    r.config_resetstat()  # per-command statistics start empty: measured at the end as what they hold
    purge(r)
    baseline = r.info("memory")["used_memory"]
    before = servers.readings()
    trace = servers.trace()
    half = args.publishes // 2
    print(f"publish: {args.publishes} versions of {adapter_bytes} bytes to {PUB_NAME!r} (keep_last "
          f"{keep_last}), Redis read after {half} and after all ...", flush=True)
    t0, tallies, used_half, clients_half = time.monotonic(), [], None, 0
    for first, count in ((0, half), (half, args.publishes - half)):
        if count == 0:
            continue
        spec = {"kind": "publish", "target": broker, "token": tokens["learner"], "name": PUB_NAME,
                "first": first, "publishes": count, "adapter_bytes": args.adapter_bytes, "cpus": args.client_cpus,
                "out": str(work / f"publish-{first}.json")}
        tallies.append(join({"publish": spawn(spec, work)}, {"publish": spec}, work, 3600)["publish"])
        if first == 0 and half < args.publishes:
            purge(r)
            m = r.info("memory")
            used_half, clients_half = m["used_memory"], m["mem_clients_normal"]
    tally = tallies[0] if len(tallies) == 1 else merge_tallies(*tallies)
    wall = time.monotonic() - t0
    rss = trace.stop()
    time.sleep(args.settle_s)
    after = servers.readings()
    # Redis is read before any other command runs (a command name used for the first time adds
    # its latency histogram); then what the per-command statistics hold, and only then the rest.
    mem = r.info("memory")
    purge(r)
    m = r.info("memory")
    used_after_purge, clients_end = m["used_memory"], m["mem_clients_normal"]
    stats_commands = len(r.info("latencystats"))
    r.config_resetstat()
    purge(r)  # the commands the baseline reading also ran, so their histograms are on both sides
    stats_bytes = max(0, used_after_purge - r.info("memory")["used_memory"])
    with BrokerClient(broker, tokens["client"]) as c:
        records, latest = c.list_versions(PUB_NAME)
    fams = redis_families(r)
    events_key = f"ll:a:{PUB_NAME}:events"
    ids_key = f"ll:a:{PUB_NAME}:pubids"
    history = history_figures(r.xlen(events_key), r.memory_usage(events_key, samples=0) or 0,
                              {"members": r.zcard(ids_key), "bytes": r.memory_usage(ids_key, samples=0) or 0},
                              reg.events_maxlen, reg.publish_ids_kept, reg.publish_id_ttl_s)
    r.close()
    s = summarize(tally, SHED["publish"])
    return {"wall_s": wall, **s, "publishes_per_s": s["ok"] / tally["seconds"] if tally["seconds"] else 0.0,
            "adapter_bytes": adapter_bytes, "keep_last": keep_last, "latest_version": latest,
            "versions_kept": [x.version for x in records], "history": history,
            "redis": {**redis_bound(baseline, keep_last, adapter_bytes, used_after_purge, s["ok"], reg.events_maxlen,
                                    reg.publish_ids_kept, used_half, min(half, s["ok"]), stats_bytes),
                      "stats_commands": stats_commands, "clients_half_bytes": clients_half,
                      "clients_end_bytes": clients_end,
                      "used_memory_before_purge": mem["used_memory"], "used_memory_rss": mem["used_memory_rss"],
                      "used_memory_peak": mem["used_memory_peak"], "families": fams},
            "servers": server_figures(before, after, rss, args)}


# ------------------------------------------------------------------ report


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"


def server_lines(servers: dict) -> list[str]:
    lines = [f"  {'server':<8} {'peak RSS MB':>11} {'RSS MB before/after':>20} {'at 1/4 2/4 3/4 4/4 of the load':>31} "
             f"{'fds before/after':>17} {'threads before/after':>21}  verdict (fds and threads)"]
    for n, s in servers.items():
        b, a = s["before"], s["after"]
        quarters = " ".join(f"{x:.0f}" for x in s["rss_mb_quarters"])
        lines.append(f"  {n:<8} {s['peak_rss_mb']:>11.0f} {b['rss_mb']:>10.0f}/{a['rss_mb']:<9.0f} {quarters:>31} "
                     f"{b['fds']:>8}/{a['fds']:<8} {b['threads']:>10}/{a['threads']:<10}  {s['verdict']}"
                     f" ({s['fds_delta']:+d} fds, {s['threads_delta']:+d} threads, {b['procs']} process"
                     f"{'es' if b['procs'] > 1 else ''})")
    return lines


def report(result: dict) -> str:
    lines = [f"loraloop bench load: {result['machine']['nproc']} CPUs (load average at start "
             f"{result['machine']['loadavg_start'][0]:.2f}); engine bound to CPU(s) {result['config']['cpu_bind']}, "
             f"clients on {result['config']['client_cpus']}; total wall {result['wall_s']:.0f} s"]
    s = result.get("serving")
    if s:
        lines.append(f"\nserving ({s['wall_s']:.0f} s, tiny model, max_tokens {result['config']['max_tokens']}, "
                     f"engine max_num_seqs {s['engine_max_num_seqs']}; requests ask base / a0 / a1@latest in turn)")
        lines.append(f"  {'api':<24} {'requests':>8} {'ok':>7} {'req/s':>6} {'shed':>5} {'errors':>6} "
                     f"{'latency p50/p99 ms':>19} {'TTFT p50/p99 ms':>16}")
        for key, label in (("grpc", f"gRPC Generate x{result['config']['grpc_streams']}"),
                           ("openai", f"OpenAI stream x{result['config']['openai_streams']}")):
            x = s[key]
            lines.append(f"  {label:<24} {x['requests']:>8} {x['ok']:>7} {x['requests_per_s']:>6.1f} "
                         f"{x['shed_total']:>5} {x['errors_total']:>6} "
                         f"{_ms(x['latency_ms_p50']):>9}/{_ms(x['latency_ms_p99']):<9} "
                         f"{_ms(x['ttft_ms_p50']):>7}/{_ms(x['ttft_ms_p99']):<8}")
            if x["shed_total"] or x["errors_total"]:
                lines.append(f"    shed (retryable): {_counts(x['shed'])}; errors: {_counts(x['errors'])}")
                lines += [f"    {k}: {v}" for k, v in list(x["examples"].items())[:4]]
        errs = s["grpc"]["errors_total"] + s["openai"]["errors_total"]
        shed = s["grpc"]["shed_total"] + s["openai"]["shed_total"]
        lines.append(f"  errors {errs} (goal 0: {'ok' if not errs else 'MISSED'}); shed with a retryable status "
                     f"{shed}{'' if shed else ' (the replica took every request)'}")
        lines += server_lines(s["servers"])
    p = result.get("publish")
    if p:
        rb = p["redis"]
        lines.append(f"\npublish: {p['ok']} of {p['requests']} publishes of {p['adapter_bytes']} bytes in "
                     f"{p['seconds']:.1f} s ({p['publishes_per_s']:.0f}/s; p50 {_ms(p['latency_ms_p50'])} ms, "
                     f"p99 {_ms(p['latency_ms_p99'])} ms each); shed {p['shed_total']}, errors "
                     f"{p['errors_total']}{' (' + _counts(p['errors']) + ')' if p['errors_total'] else ''}")
        lines.append(f"  retention: keep_last {p['keep_last']}, latest v{p['latest_version']}, versions kept "
                     f"{len(p['versions_kept'])} (v{min(p['versions_kept'], default=0)}..v"
                     f"{max(p['versions_kept'], default=0)})")
        lines.append(f"  Redis used_memory after retention {rb['used_bytes'] / 1e6:.3f} MB vs bound "
                     f"{rb['bound_bytes'] / 1e6:.3f} MB = before the publishes {rb['baseline_bytes'] / 1e6:.3f} MB + "
                     f"keep_last x adapter {rb['keep_last'] * rb['adapter_bytes'] / 1e6:.3f} MB + overhead allowance "
                     f"{rb['overhead_allowance_bytes'] / 1e6:.3f} MB (measured overhead "
                     f"{rb['overhead_bytes'] / 1e6:.3f} MB): ratio {rb['ratio']:.2f} "
                     f"({'within the bound: ok' if rb['within_bound'] else 'OVER the bound: goal MISSED'})")
        lines.append(f"  overhead allowance = {rb['keep_last']} versions x {PER_VERSION_ALLOWANCE} B + events_maxlen "
                     f"{rb['events_maxlen']} x {PER_EVENT_ALLOWANCE} B + publish_ids_kept {rb['publish_ids_kept']} x "
                     f"{PER_PUBLISH_ID_ALLOWANCE} B + Redis's per-command latency histograms "
                     f"{rb.get('stats_bytes', 0) / 1e6:.3f} MB ({rb.get('stats_commands', '?')} command names; "
                     "what CONFIG RESETSTAT frees)")
        if rb.get("growth_bytes_per_publish") is not None:
            lines.append(f"  after {rb['half_publishes']} publishes {rb['used_half_bytes'] / 1e6:.3f} MB, after "
                         f"{p['ok']} {rb['used_bytes'] / 1e6:.3f} MB: {rb['growth_bytes_per_publish']:.1f} bytes "
                         f"per publish over the second half (clients' buffers {rb.get('clients_half_bytes', 0) / 1e3:.0f} "
                         f"-> {rb.get('clients_end_bytes', 0) / 1e3:.0f} KB of it)")
        lines.append("  Redis keys by family (MEMORY USAGE): " + "; ".join(
            f"{f} {v['keys']} keys {v['bytes'] / 1e6:.3f} MB"
            for f, v in sorted(rb["families"].items(), key=lambda kv: -kv[1]["bytes"])))
        h = p["history"]
        lines.append(f"  history kept: event stream {h['events']} entries (events_maxlen {h['events_maxlen']}), "
                     f"{h['events_bytes'] / 1e3:.0f} KB, {h['bytes_per_event']:.0f} B each; publish ids "
                     f"{h['publish_ids']} (publish_ids_kept {h['publish_ids_kept']}), {h['publish_ids_bytes'] / 1e3:.1f} KB, "
                     f"forgotten {h['publish_id_ttl_s']:,} s after the last publish")
        lines += server_lines(p["servers"])
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def run(args: argparse.Namespace, work: Path) -> dict:
    from services.bench.broker import ROLES, start_broker, start_redis
    from services.bench.rollout import make_adapters
    from services.bench.serving import publish
    from services.common.proc import stop_process
    from services.common.tiny_model import make_tiny_model

    tokens = {r: secrets.token_urlsafe(16) for r in ROLES}
    result: dict = {"benchmark": "load", "machine": {"nproc": os.cpu_count(), "loadavg_start": list(os.getloadavg())},
                    "config": {k: v for k, v in vars(args).items() if k not in ("out", "worker", "work_dir")}}
    t0 = time.monotonic()
    redis_proc, redis_url = start_redis(work / "redis")
    broker_proc = replica = None
    try:
        broker_proc, broker = start_broker(redis_url, work, tokens, 64 * 2**20)
        pids = {"redis": redis_proc.pid, "broker": broker_proc.pid}
        if "serving" in args.parts:
            model = make_tiny_model(work / "model", seed=0, shape="tiny")
            publish(broker, tokens["learner"], model, make_adapters(model, work / "adapters", [0, 1]),
                    list(ADAPTERS))
            print("starting the rollout replica (vLLM CPU engine) ...", flush=True)
            replica, target, url = start_replica(model, broker, tokens, work, args)
            result["serving"] = serving_part(args, work, Servers({"rollout": replica.pid, **pids}), target, url,
                                             tokens["client"], str(model))
            stop_process(replica, timeout_s=30)
            replica = None
        if "publish" in args.parts:
            result["publish"] = publish_part(args, work, Servers(pids), broker, redis_url, tokens)
    finally:
        stop_process(replica, timeout_s=30)
        stop_process(broker_proc)
        stop_process(redis_proc)
    result["wall_s"] = time.monotonic() - t0
    return result


def failed(result: dict) -> bool:
    """Any failed request or publish, or a leak verdict (exit 1). Redis past its bound is a
    goal missed, printed as such: the broker keeps a bounded history per publish by design
    (docs/scaling.md, memory held)."""
    s, p = result.get("serving"), result.get("publish")
    parts = [x for x in (s, p) if x]
    errs = (s["grpc"]["errors_total"] + s["openai"]["errors_total"] if s else 0) + (p["errors_total"] if p else 0)
    leaks = any(v["leak"] for x in parts for v in x["servers"].values())
    return bool(errs or leaks)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="loraloop-bench-load-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, work)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    emit(report(result), result, args.out)
    return 1 if failed(result) else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
