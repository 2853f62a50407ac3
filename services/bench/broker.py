"""`loraloop bench broker`: how close the broker gets to the Redis it stands on.

For each adapter size it times publish and fetch through the broker (gRPC stream, sha256 on
both sides, staging + Lua commit in Redis) against a floor measured in the same run on the
same Redis: one redis-py SET of the same bytes and one GET. Then it times how long 64
watchers take to hear of a new version. It starts its own redis-server (AOF, appendfsync
always) and broker, and stops both by pid.

Goals: publish+fetch within 1.5x of the floor; p99 watch notification under 50 ms.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.bench import emit, percentile, read_lines
from services.common import redis_server
from services.common.net import free_port
from services.common.proc import stop_process

if TYPE_CHECKING:
    import redis

    from services.broker.client import BrokerClient

MB = 1_000_000
GOAL_RATIO = 1.5
GOAL_P99_MS = 50.0
FINGERPRINT = "sha256:" + "be" * 32
ROLES = ("learner", "rollout", "client")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="loraloop bench broker",
        description="Publish/fetch throughput of the broker against a raw Redis SET/GET floor, "
                    "and watch notification latency. Starts its own redis-server and broker.",
    )
    p.add_argument("--out", type=Path, help="write every figure to this JSON file")
    p.add_argument("--sizes", default="1,35,150", help="adapter sizes in MB (10^6 bytes), comma separated")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per size (the median is reported)")
    p.add_argument("--watchers", type=int, default=64, help="concurrent watch streams")
    p.add_argument("--publishes", type=int, default=50, help="small versions published while watched")
    p.add_argument("--spacing-ms", type=float, default=50.0, help="time between watched publishes")
    p.add_argument("--quick", action="store_true",
                   help="1 MB only, 1 repeat, 8 watchers, 10 publishes (for tests)")
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.repeats, a.watchers, a.publishes = "1", 1, 8, 10
    a.sizes = [float(s) for s in a.sizes.split(",") if s.strip()]
    if not a.sizes or min(a.sizes) <= 0 or a.repeats < 1 or a.watchers < 1 or a.publishes < 2:
        p.error("sizes must be positive, repeats and watchers >= 1, publishes >= 2")
    return a


# ------------------------------------------------------------------ processes


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    """redis-server as the broker requires it (services.common.redis_server), logging to workdir."""
    try:
        redis_server.require()
        port = free_port()
        proc = subprocess.Popen(redis_server.command(port, workdir, logfile=workdir / "redis.log"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            redis_server.wait_ready(port, exited=lambda: proc.poll() is not None, timeout_s=15)
        except RuntimeError:
            stop_process(proc)
            raise
    except RuntimeError as e:
        raise SystemExit(f"loraloop bench: {e}; see {workdir / 'redis.log'}") from None
    return proc, f"redis://127.0.0.1:{port}/0"


def start_broker(redis_url: str, workdir: Path, tokens: dict[str, str],
                 max_adapter_bytes: int) -> tuple[subprocess.Popen, str]:
    from services.broker.client import BrokerClient

    port = free_port()
    log_path = workdir / "broker.log"
    env = {**os.environ, "LORALOOP_TOKENS": ",".join(f"{r}:{t}" for r, t in tokens.items())}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "broker", "--port", str(port), "--redis-url", redis_url,
             f"--registry.max_adapter_bytes={max_adapter_bytes}", "--server.grace_s=1"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    with BrokerClient(target, tokens["client"]) as c:
        while True:
            try:
                c.wait_ready(1.0)
                return proc, target
            except TimeoutError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_process(proc)
                raise SystemExit(f"broker did not start:\n{log_path.read_text()[-2000:]}")


# ------------------------------------------------------------------ adapters


def make_adapter(size_bytes: int, seed: int, rank: int = 16) -> tuple[dict, bytes]:
    """A random PEFT LoRA adapter (q_proj, v_proj) of about `size_bytes`: up to 32 layers,
    hidden width chosen to reach the size."""
    import numpy as np
    from safetensors.numpy import save

    modules = ("q_proj", "v_proj")
    layers = min(32, max(1, round(size_bytes / MB)))
    hidden = max(8, math.ceil(size_bytes / (4 * layers * len(modules) * 2 * rank)))
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for m in modules:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{m}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, hidden), dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((hidden, rank), dtype=np.float32)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(modules),
              "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}
    return config, save(tensors)


# ------------------------------------------------------------------ throughput


@dataclass
class Repeat:
    """Seconds for one repeat of one size."""

    broker_publish: float
    broker_fetch: float
    floor_set: float
    floor_get: float
    sha256: float


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def measure_size(size_mb: float, repeats: int, pub: BrokerClient, reader: BrokerClient,
                 r: redis.Redis, bar) -> dict:
    """Median publish/fetch through the broker and SET/GET on Redis, same bytes, same run."""
    import hashlib

    name = f"bench-{size_mb:g}mb".replace(".", "p")
    epoch, _ = pub.acquire_publisher(name)
    runs: list[Repeat] = []
    size = 0
    for rep in range(repeats):
        bar.set_description(f"{size_mb:g} MB, repeat {rep + 1}/{repeats}")
        config, data = make_adapter(int(size_mb * MB), seed=rep)
        size = len(data)
        t0 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        t_sha = time.perf_counter() - t0

        key = f"bench:floor:{name}"
        t0 = time.perf_counter()
        r.set(key, data)
        t1 = time.perf_counter()
        got = r.get(key)
        t2 = time.perf_counter()
        if got is None or len(got) != size:
            raise RuntimeError("floor GET returned other bytes than SET stored")
        del got
        r.delete(key)
        bar.update(2 * size)

        t3 = time.perf_counter()
        rec, _ = pub.publish_bytes(name, epoch, config, data, FINGERPRINT, learner_step=rep)
        t4 = time.perf_counter()
        _, fetched = reader.fetch(f"{name}@v{rec.version}")
        t5 = time.perf_counter()
        if len(fetched) != size:
            raise RuntimeError("broker fetch returned other bytes than were published")
        del fetched, data
        bar.update(2 * size)
        runs.append(Repeat(t4 - t3, t5 - t4, t1 - t0, t2 - t1, t_sha))

    def leg(broker: list[float], floor: list[float]) -> dict:
        b, f = _median(broker), _median(floor)
        return {"broker_s": b, "floor_s": f, "broker_mb_s": size / MB / b, "floor_mb_s": size / MB / f,
                "ratio": b / f}

    return {
        "size_mb": size_mb, "bytes": size, "repeats": repeats,
        "publish": leg([x.broker_publish for x in runs], [x.floor_set for x in runs]),
        "fetch": leg([x.broker_fetch for x in runs], [x.floor_get for x in runs]),
        "publish_fetch": leg([x.broker_publish + x.broker_fetch for x in runs],
                             [x.floor_set + x.floor_get for x in runs]),
        "sha256_s": _median([x.sha256 for x in runs]),
        "samples": [vars(x) for x in runs],
    }


# ------------------------------------------------------------------ watch


def measure_watch(target: str, tokens: dict[str, str], watchers: int, publishes: int,
                  spacing_s: float) -> dict:
    """`watchers` threads, each its own client and watch stream on one name; `publishes` small
    versions, one every `spacing_s`. Latency is the watcher's receipt time minus the time the
    publish call started, and minus the time it returned (the commit ack)."""
    from tqdm import tqdm

    from services.broker.client import BrokerClient

    name = "bench-watch"
    pub = BrokerClient(target, tokens["learner"])
    epoch, latest = pub.acquire_publisher(name)
    small = [make_adapter(4096, seed=1000 + i, rank=4) for i in range(publishes + 1)]
    cond = threading.Condition()
    received: dict[int, list[float]] = {}  # version -> receipt times, one per watcher
    errors: list[BaseException] = []
    clients = [BrokerClient(target, tokens["rollout"]) for _ in range(watchers)]
    streams = [c.watch({name: latest}) for c in clients]

    def run(stream) -> None:
        try:
            for rec, _live in stream:
                now = time.perf_counter()
                with cond:
                    received.setdefault(rec.version, []).append(now)
                    cond.notify_all()
        except BaseException as e:
            errors.append(e)

    def wait_all(version: int, timeout: float) -> None:
        with cond:
            if not cond.wait_for(lambda: len(received.get(version, ())) >= watchers or errors, timeout):
                raise RuntimeError(f"only {len(received.get(version, ()))} of {watchers} watchers saw v{version}")
        if errors:
            raise RuntimeError(f"a watcher failed: {errors[0]!r}")

    threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in streams]
    try:
        for t in threads:
            t.start()
        # A warm-up version proves every stream is open and live before anything is timed.
        rec, _ = pub.publish_bytes(name, epoch, *small[0], FINGERPRINT)
        wait_all(rec.version, 60)
        sent: dict[int, tuple[float, float]] = {}  # version -> (call start, ack)
        start = time.perf_counter()
        for i in tqdm(range(publishes), desc=f"watch ({watchers} watchers)", disable=None, leave=False):
            time.sleep(max(0.0, start + i * spacing_s - time.perf_counter()))
            t_call = time.perf_counter()
            rec, _ = pub.publish_bytes(name, epoch, *small[i + 1], FINGERPRINT, learner_step=i + 1)
            sent[rec.version] = (t_call, time.perf_counter())
        wait_all(max(sent), 30)
    finally:
        for s in streams:
            s.close()
        for t in threads:
            t.join(5)
        for c in [pub, *clients]:
            c.close()

    with cond:
        from_call = [t - sent[v][0] for v in sent for t in received[v]]
        from_ack = [t - sent[v][1] for v in sent for t in received[v]]
    ack_ms = [(a - c) * 1000 for c, a in sent.values()]
    return {
        "watchers": watchers, "publishes": publishes, "spacing_ms": spacing_s * 1000,
        "events": len(from_call),
        "from_call_ms": {"p50": percentile(from_call, 50) * 1000, "p99": percentile(from_call, 99) * 1000,
                         "max": max(from_call) * 1000},
        "from_ack_ms": {"p50": percentile(from_ack, 50) * 1000, "p99": percentile(from_ack, 99) * 1000,
                        "max": max(from_ack) * 1000},
        "publish_call_ms": {"p50": percentile(ack_ms, 50), "p99": percentile(ack_ms, 99)},
    }


# ------------------------------------------------------------------ report


def machine_info(r: redis.Redis, workdir: Path) -> dict:
    import grpc
    import redis as redis_py

    cpu = next((ln.split(":", 1)[1].strip() for ln in read_lines("/proc/cpuinfo") if ln.startswith("model name")), "")
    mounts = [ln.split() for ln in read_lines("/proc/mounts")]
    fs = max((m for m in mounts if len(m) > 2 and str(workdir).startswith(m[1])), key=lambda m: len(m[1]), default=None)
    persistence = r.info("persistence")
    return {
        "nproc": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "cpu_model": cpu,
        "python": platform.python_version(), "platform": platform.platform(),
        "redis_version": r.info("server")["redis_version"], "redis_py": redis_py.__version__,
        "grpcio": grpc.__version__, "redis_dir_fs": fs[2] if fs else "unknown",
        "redis_aof_rewrites": persistence.get("aof_rewrites"),
    }


def report(result: dict) -> str:
    m, w = result["machine"], result["watch"]
    lines = [
        f"loraloop bench broker: {m['nproc']} CPUs, Python {m['python']}, Redis {m['redis_version']} "
        f"(AOF, appendfsync always, {m['redis_dir_fs']}; {m['redis_aof_rewrites']} AOF rewrites during the run)",
        "",
        f"{'size':>6} | {'publish MB/s':^23} | {'fetch MB/s':^23} | publish+fetch",
        f"{'MB':>6} | {'broker':>7} {'floor':>7} {'ratio':>7} | {'broker':>7} {'floor':>7} {'ratio':>7} | "
        f"{'ratio':>7}  goal <={GOAL_RATIO:g}",
    ]
    for s in result["throughput"]:
        p, f, pf = s["publish"], s["fetch"], s["publish_fetch"]
        lines.append(
            f"{s['size_mb']:>6g} | {p['broker_mb_s']:>7.1f} {p['floor_mb_s']:>7.1f} {p['ratio']:>6.2f}x | "
            f"{f['broker_mb_s']:>7.1f} {f['floor_mb_s']:>7.1f} {f['ratio']:>6.2f}x | "
            f"{pf['ratio']:>6.2f}x  {'ok' if pf['ratio'] <= GOAL_RATIO else 'MISSED'}")
    lines += [
        "ratio = broker time / floor time; floor = redis-py SET / GET of the same bytes on the same",
        f"Redis; medians of {result['config']['repeats']} repeats",
        "",
        f"watch: {w['watchers']} watchers x {w['publishes']} publishes, {w['events']} notifications"
        " (negative: heard before the publisher had its ack)",
        f"  from commit ack:    p50 {w['from_ack_ms']['p50']:6.1f} ms   p99 {w['from_ack_ms']['p99']:6.1f} ms"
        f"   goal p99 < {GOAL_P99_MS:g} ms: {'ok' if w['from_ack_ms']['p99'] < GOAL_P99_MS else 'MISSED'}",
        f"  from publish call:  p50 {w['from_call_ms']['p50']:6.1f} ms   p99 {w['from_call_ms']['p99']:6.1f} ms"
        f"   (publish call itself: p50 {w['publish_call_ms']['p50']:.1f} ms)",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import redis
    from tqdm import tqdm

    from services.broker.client import BrokerClient

    tokens = {role: secrets.token_urlsafe(18) for role in ROLES}
    workdir = Path(tempfile.mkdtemp(prefix="loraloop-bench-broker-"))
    redis_proc = broker_proc = None
    try:
        redis_proc, redis_url = start_redis(workdir)
        max_bytes = max(200 * 2**20, int(max(args.sizes) * MB * 1.1))
        broker_proc, target = start_broker(redis_url, workdir, tokens, max_bytes)
        r = redis.Redis.from_url(redis_url)
        pub, reader = BrokerClient(target, tokens["learner"]), BrokerClient(target, tokens["client"])
        throughput = []
        total = sum(int(s * MB) * 4 * args.repeats for s in args.sizes)
        with tqdm(total=total, unit="B", unit_scale=True, disable=None, leave=False) as bar:
            for size in args.sizes:
                throughput.append(measure_size(size, args.repeats, pub, reader, r, bar))
        pub.close()
        reader.close()
        watch = measure_watch(target, tokens, args.watchers, args.publishes, args.spacing_ms / 1000)
        result = {
            "benchmark": "broker",
            "machine": machine_info(r, workdir),
            "config": {"sizes_mb": args.sizes, "repeats": args.repeats, "watchers": args.watchers,
                       "publishes": args.publishes, "spacing_ms": args.spacing_ms, "quick": args.quick,
                       "max_adapter_bytes": max_bytes},
            "goals": {"publish_fetch_ratio_max": GOAL_RATIO, "watch_p99_ms_max": GOAL_P99_MS},
            "throughput": throughput,
            "watch": watch,
        }
        result["goals"]["met"] = {
            "publish_fetch_ratio": all(s["publish_fetch"]["ratio"] <= GOAL_RATIO for s in throughput),
            "watch_p99": watch["from_ack_ms"]["p99"] < GOAL_P99_MS,
        }
        r.close()
    finally:
        stop_process(broker_proc)
        stop_process(redis_proc)
        shutil.rmtree(workdir, ignore_errors=True)
    emit(report(result), result, args.out)
    return 0
