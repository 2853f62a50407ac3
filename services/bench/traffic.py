"""`loraloop bench traffic RUN_DIR`: users on the fleet while it trains.

Against a stack that `loraloop up` is running (it reads RUN_DIR/stack.env), in three windows:
quiet, then N concurrent streaming OpenAI clients (the official `openai` package), then quiet
again. The clients spread over every replica and ask for each run's adapter at `@latest`,
pinned at a version they were just served (`name@vN`), and the base, by completions and chat,
and check that every chunk of a response names one version and the one asked for. It prints
each run's training step time in the quiet windows and under traffic, the requests, failures,
time to first token and tokens/s, and what each replica's /metrics counted per learner and
adapter (each run's leases and groups carry only its own adapter).

Goal (issue 16): no request fails; training keeps going under the traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from services.bench import emit, percentile, wait_http_ok


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="loraloop bench traffic",
        description="Streaming OpenAI clients against a training stack (`loraloop up`): versions served, "
                    "failures, TTFT, and the runs' step time with and without the traffic.")
    p.add_argument("run_dir", type=Path, help="the stack's run dir (holds stack.env)")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    p.add_argument("--quiet-s", type=float, default=20.0, help="length of each quiet window (before and after)")
    p.add_argument("--traffic-s", type=float, default=40.0, help="length of the traffic window")
    p.add_argument("--max-tokens", type=int, default=8, help="max_tokens of each request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write every figure to this JSON file")
    return p.parse_args(argv)


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@dataclass
class Tally:
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    tokens: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    versions: dict[str, set[str]] = field(default_factory=dict)


class Clients:
    """N tasks, each looping over (url, selector, endpoint) until told to stop."""

    def __init__(self, urls: list[str], key: str, adapters: list[str], base: str, max_tokens: int, seed: int) -> None:
        from openai import AsyncOpenAI

        self.clients = [AsyncOpenAI(base_url=u, api_key=key, max_retries=0, timeout=60) for u in urls]
        self.adapters, self.base, self.max_tokens = adapters, base, max_tokens
        self.served: dict[str, str] = {}  # adapter -> the latest version a client was served
        self.tally = Tally()
        self.rng = random.Random(seed)

    def _plan(self, k: int):
        kinds = [(a, "latest") for a in self.adapters] + [(a, "pinned") for a in self.adapters] + [("", "base")]
        for n in itertools.count(k):
            yield self.clients[n % len(self.clients)], kinds[n % len(kinds)], ("chat" if (n // len(kinds)) % 2 else
                                                                            "completions")

    async def one(self, client, kind: tuple[str, str], endpoint: str) -> None:
        adapter, how = kind
        if how == "base":
            model, want = self.base, self.base
        elif how == "pinned" and adapter in self.served:
            model = want = self.served[adapter]
        else:
            how, model, want = "latest", f"{adapter}@latest", f"{adapter}@v"
        label = f"{adapter or 'base'}:{how}"
        a, b = self.rng.randint(0, 9), self.rng.randint(0, 9)
        t0 = time.perf_counter()
        first: float | None = None
        models: set[str] = set()
        tokens = 0
        opts = {"include_usage": True}
        if endpoint == "chat":
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"{a}+{b}="}], max_tokens=self.max_tokens,
                temperature=1.0, stream=True, stream_options=opts)
        else:
            stream = await client.completions.create(model=model, prompt=f"{a}+{b}=", max_tokens=self.max_tokens,
                                                     temperature=1.0, stream=True, stream_options=opts)
        async for chunk in stream:
            models.add(chunk.model)
            if chunk.choices and first is None:
                first = time.perf_counter() - t0
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens or 0
        if len(models) != 1:
            raise AssertionError(f"{label}: one response named {sorted(models)}")
        got = models.pop()
        ok = got.startswith(want) and got[len(want):].isdigit() if how == "latest" else got == want
        if not ok:
            raise AssertionError(f"{label}: asked {model!r}, served {got!r}")
        if how == "latest":
            self.served[adapter] = got
        t = self.tally
        t.versions.setdefault(label, set()).add(got)
        t.by_kind[label] = t.by_kind.get(label, 0) + 1
        t.tokens += tokens
        if first is not None:
            t.ttft_s.append(first)

    async def run(self, n: int, seconds: float) -> float:
        stop = time.monotonic() + seconds

        async def loop(k: int) -> None:
            for client, kind, endpoint in self._plan(k):
                if time.monotonic() >= stop:
                    return
                self.tally.requests += 1
                try:
                    await self.one(client, kind, endpoint)
                except Exception as e:  # every failure is counted and shown
                    self.tally.failures.append(f"{type(e).__name__}: {e}"[:300])

        t0 = time.monotonic()
        await asyncio.gather(*(loop(k) for k in range(n)))
        return time.monotonic() - t0


def step_stats(rows: list[dict], t0: float, t1: float) -> dict:
    inside = [r for r in rows if t0 <= r.get("time", 0) < t1]
    steps = [r["timing_s/step"] for r in inside]
    return {"steps": len(inside), "steps_per_s": len(inside) / max(t1 - t0, 1e-9),
            "step_s_mean": statistics.fmean(steps) if steps else float("nan"),
            "step_s_median": statistics.median(steps) if steps else float("nan")}


def scrape(url: str) -> dict[str, float]:
    """`series{labels} -> value` of the loraloop_leases/groups counters at a replica's /metrics."""
    text = urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(("loraloop_leases_total", "loraloop_groups_submitted_total"))}


def wait_ready(urls: list[str], timeout_s: float = 300.0) -> None:
    """Until every replica's /health answers 200 (a stack's replicas start after its learners)."""
    deadline = time.monotonic() + timeout_s
    for url in urls:
        if not wait_http_ok(url.removesuffix("/v1") + "/health", max(0.0, deadline - time.monotonic())):
            raise SystemExit(f"{url}: not serving after {timeout_s:.0f} s")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    env = read_env(args.run_dir / "stack.env")
    urls = env["LORALOOP_OPENAI_URLS"].split(",")
    learners = dict(p.split("=", 1) for p in env.get("LORALOOP_LEARNERS", "").split(",") if "=" in p)
    if not learners:
        raise SystemExit("stack.env names no learners (LORALOOP_LEARNERS); is this a `loraloop up` run dir?")
    run_dirs = {a: args.run_dir / a if len(learners) > 1 else args.run_dir for a in learners}

    wait_ready(urls)
    from openai import OpenAI

    base = OpenAI(base_url=urls[0], api_key=env["OPENAI_API_KEY"]).models.list().data[0].id
    metrics = {a: d / "metrics.jsonl" for a, d in run_dirs.items()}
    clients = Clients(urls, env["OPENAI_API_KEY"], list(learners), base, args.max_tokens, args.seed)

    def rows(a: str) -> list[dict]:
        p = metrics[a]
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []

    print(f"{len(urls)} replica(s), runs {', '.join(learners)}; quiet {args.quiet_s:.0f} s, {args.clients} "
          f"streaming clients for {args.traffic_s:.0f} s, quiet {args.quiet_s:.0f} s", flush=True)
    t = [time.time()]
    time.sleep(args.quiet_s)
    t.append(time.time())
    wall = asyncio.run(clients.run(args.clients, args.traffic_s))
    t.append(time.time())
    time.sleep(args.quiet_s)
    t.append(time.time())

    runs = {}
    for a in learners:
        r = rows(a)
        before, during, after = (step_stats(r, t[i], t[i + 1]) for i in range(3))
        quiet_s = statistics.fmean(x["step_s_mean"] for x in (before, after) if x["steps"]) if (
            before["steps"] or after["steps"]) else float("nan")
        runs[a] = {"quiet_before": before, "traffic": during, "quiet_after": after,
                   "step_s_quiet": quiet_s, "step_s_traffic": during["step_s_mean"],
                   "traffic_over_quiet": during["step_s_mean"] / quiet_s if quiet_s == quiet_s else float("nan")}
    tl = clients.tally
    replicas = {u: scrape(u) for u in urls}
    result = {
        "clients": args.clients, "traffic_s": wall, "requests": tl.requests, "failed": len(tl.failures),
        "failures": tl.failures[:20], "by_kind": tl.by_kind,
        "versions_served": {k: sorted(v) for k, v in tl.versions.items()},
        "ttft_s_p50": percentile(tl.ttft_s, 50) if tl.ttft_s else None,
        "ttft_s_p99": percentile(tl.ttft_s, 99) if tl.ttft_s else None,
        "completion_tokens": tl.tokens, "tokens_per_s": tl.tokens / wall, "runs": runs, "replica_counters": replicas,
    }
    lines = [f"requests {tl.requests} in {wall:.1f} s, failed {len(tl.failures)}; completion tokens/s "
             f"{result['tokens_per_s']:.1f}; TTFT p50 {1000 * (result['ttft_s_p50'] or 0):.0f} ms, "
             f"p99 {1000 * (result['ttft_s_p99'] or 0):.0f} ms"]
    lines += [f"  {k:<22} {tl.by_kind.get(k, 0):>5} requests, {len(v)} distinct versions served "
              f"({', '.join(sorted(v)[:3])}{', ...' if len(v) > 3 else ''})" for k, v in sorted(tl.versions.items())]
    lines += [f"  failure: {f}" for f in tl.failures[:5]]
    lines.append("training step time (s, mean)   quiet before   traffic   quiet after   traffic/quiet")
    for a, r in runs.items():
        lines.append(f"  {a:<28} {r['quiet_before']['step_s_mean']:>12.3f} {r['traffic']['step_s_mean']:>9.3f} "
                     f"{r['quiet_after']['step_s_mean']:>13.3f} {r['traffic_over_quiet']:>15.2f}   "
                     f"(steps {r['quiet_before']['steps']}/{r['traffic']['steps']}/{r['quiet_after']['steps']})")
    lines.append("per replica /metrics (learner, adapter): leases, groups ok")
    for u, c in replicas.items():
        for series, v in sorted(c.items()):
            if series.startswith("loraloop_leases_total") or 'outcome="ok"' in series:
                lines.append(f"  {u.split('//')[1].removesuffix('/v1')} {series} {v:.0f}")
    emit("\n".join(lines), result, args.out)
    return 0 if not tl.failures else 1


if __name__ == "__main__":
    raise SystemExit(main(__import__("sys").argv[1:]))
