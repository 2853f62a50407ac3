"""`loraloop chaos [CONFIG]`: the local stack under faults, checked from outside.

It runs `loraloop up` (by default the tiny demo with 2 rollout replicas) and, at moments drawn
from `--seed`, SIGKILLs in turn the broker, Redis, the learner and a rollout replica (each at
least once; `--rounds` repeats the cycle), each only after the one before has come back,
while OpenAI-API clients (the official `openai` client) keep querying the replicas. The
stack's supervisor restarts whatever dies. At the end it checks and prints (and exits 1 if any
check fails):

- every step ran; reward rose (first/last 5-step means);
- the broker's versions strictly increasing, gap-free within each publisher epoch, none
  reused, and every version the learner saw acknowledged still there after the Redis kill;
- no trajectory group trained twice (the trained lineage's group ids from consumed.jsonl),
  and the lease table's counts: leased, leased again, accepted, refused as duplicates, lost
  to staleness;
- inference requests: how many, how many failed and with what status, whether each failure
  was in flight on a replica being killed (goal: all of them, each with a retryable status),
  and none answered by a version that does not exist or is not the one pinned;
- every process it started is gone at the end, and no scratch file is left.

The report goes to stdout and <run_dir>/chaos.json.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.stack import _MetricsTail

# The replica last: on 2 cores a replica restarting beside a training one takes minutes (its
# engine start shares core 0 with the other replica's generation), so it comes back once
# training has ended; the services before it come back in seconds and training goes on.
ORDER = ("broker", "redis", "learner", "rollout")
BACK_AFTER_TRAINING_S = 300
RETRYABLE = {"unreachable", "connection", "timeout", "502", "503", "504", "429"}

SUMMARY = __doc__.split("\n\n", 1)[1].rsplit("\n\nThe report", 1)[0]

CHAOS_DEFAULTS = ["--run-dir=runs/chaos", "--rollout-replicas=2", "--steps=300", "--plot=false",
                  # every version is kept, so "every acknowledged publish is there" can be checked
                  "--broker.registry.keep_last=100000"]


@dataclass
class Options:
    seed: int = 0
    rounds: int = 1
    clients: int = 4
    order: tuple[str, ...] = ORDER


def take_options(argv: list[str]) -> tuple[list[str], Options]:
    o, rest = Options(), []
    it = iter(argv)
    for a in it:
        name, eq, value = a.partition("=")
        if name in ("--seed", "--rounds", "--clients", "--order"):
            value = value if eq else next(it, "")
            if not value:
                raise SystemExit(f"loraloop chaos: {name} needs a value")
            if name == "--order":
                order = tuple(x.strip() for x in value.split(",") if x.strip())
                if not order or set(order) - set(ORDER):
                    raise SystemExit(f"loraloop chaos: --order takes services from {', '.join(ORDER)}")
                o.order = order
            else:
                try:
                    setattr(o, name[2:], int(value))
                except ValueError:
                    raise SystemExit(f"loraloop chaos: {name} takes an integer, got {value!r}") from None
        else:
            rest.append(a)
    if o.rounds < 1 or o.clients < 0:
        raise SystemExit("loraloop chaos: --rounds must be >= 1 and --clients >= 0")
    return rest, o


HELP = f"""usage: loraloop chaos [CONFIG.toml] [--seed N] [--rounds N] [--clients N] [--order LIST]
                      [any `loraloop up` setting, e.g. --steps=300 --rollout-replicas=2]

{SUMMARY}

chaos options:
  --seed N        the kill moments and the clients' prompts (default 0)
  --rounds N      kill cycles (default 1: each service once)
  --clients N     OpenAI-API clients querying throughout (default 4)
  --order LIST    the services killed, in turn (default {','.join(ORDER)}; a killed
                  service is waited for, up to {BACK_AFTER_TRAINING_S} s past the end of training)

defaults it sets before CONFIG's and yours: {' '.join(CHAOS_DEFAULTS)}
A stack with [tls] (or --tls.cert_file/key_file/ca_file, --tls.mutual) runs the same way: the
clients and probes verify the servers with its CA (and present its certificate when mutual).
`loraloop up --help` lists every other setting."""


# ---------------------------------------------------------------------------- the plan


def first_kill_step(steps: int, rng: random.Random) -> int:
    """The first kill comes after a random step between 1/8 and 1/5 of the run (so the reward has
    steps before any fault); each later one `gap_steps` after the one before is back."""
    return max(1, int(steps * rng.uniform(0.125, 0.2)))


def gap_steps(rng: random.Random) -> int:
    return rng.randint(3, 12)


# ---------------------------------------------------------------------------- the clients


@dataclass
class Request:
    client: int
    replica: int
    model: str
    t0: float
    t1: float = 0.0
    outcome: str = "ok"  # ok | a status code | connection | timeout | unreachable | error
    detail: str = ""
    served: str = ""
    in_kill_window: bool = False


def _refused(e: BaseException) -> bool:
    """A connect that failed (refused, or no route): the request never reached a server."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError) or type(seen).__name__ == "ConnectError":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Clients:
    """`n` threads, each sending one completion at a time to the replicas in turn, with the
    official `openai` client (no retries of its own): `name@latest` mostly, and a version it was
    served before, pinned, one time in five. A replica that refuses the connection (nothing was
    in flight) is skipped for a second and the request goes to the next: counted as
    `unreachable`, not as a failure."""

    def __init__(self, urls: list[str], api_key: str, adapter: str, n: int, seed: int, ssl_context=None) -> None:
        self.urls, self.key, self.adapter, self.n, self.seed = urls, api_key, adapter, n, seed
        self.ssl_context = ssl_context  # https replicas: an ssl.SSLContext that verifies them
        self.requests: list[Request] = []
        self.stop = threading.Event()
        self.down_until = [0.0] * len(urls)
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(k,), name=f"chaos-client-{k}", daemon=True)
                        for k in range(n)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _loop(self, k: int) -> None:
        import openai

        rng = random.Random(f"{self.seed}:{k}")
        http = {}
        if self.ssl_context is not None:
            import httpx

            http = {"http_client": httpx.Client(verify=self.ssl_context, timeout=120)}
        clients = [openai.OpenAI(base_url=u, api_key=self.key, max_retries=0, timeout=120, **http) for u in self.urls]
        seen: list[str] = []
        turn = k
        while not self.stop.is_set():
            turn += 1
            r = turn % len(self.urls)
            if time.monotonic() < self.down_until[r]:
                if all(time.monotonic() < d for d in self.down_until):
                    time.sleep(0.2)
                continue
            model = rng.choice(seen[-5:]) if seen and rng.random() < 0.2 else f"{self.adapter}@latest"
            req = Request(k, r, model, time.time())
            try:
                out = clients[r].completions.create(model=model, prompt=f"{rng.randrange(10)}+{rng.randrange(10)}=",
                                                    max_tokens=3, temperature=0)
                req.served = out.model
                if out.model.startswith(self.adapter + "@v") and out.model not in seen:
                    seen.append(out.model)
            except openai.APIStatusError as e:
                req.outcome, req.detail = str(e.status_code), str(e.message)[:200]
            except openai.APITimeoutError:
                req.outcome = "timeout"
            except openai.APIConnectionError as e:
                if _refused(e):  # the connection was refused: nothing was sent
                    req.outcome = "unreachable"
                    self.down_until[r] = time.monotonic() + 1.0
                else:
                    req.outcome, req.detail = "connection", f"{type(e.__cause__).__name__}: {e.__cause__}"[:200]
            except Exception as e:
                req.outcome = f"error:{type(e).__name__}"
            req.t1 = time.time()
            with self._lock:
                self.requests.append(req)
            time.sleep(0.2 if req.outcome not in ("ok", "unreachable") else 0.05)


def stack_ssl(cfg):
    """An SSL context for the stack's HTTPS servers under [tls]: their certificates verified with
    its CA, and its certificate presented as the client's when `mutual` (None: plain HTTP)."""
    if not cfg.tls.enabled:
        return None
    import ssl

    ctx = ssl.create_default_context(cafile=cfg.tls.ca_file)
    if cfg.tls.mutual:
        ctx.load_cert_chain(cfg.tls.cert_file, cfg.tls.key_file)
    return ctx


# ---------------------------------------------------------------------------- the monkey


@dataclass
class Kill:
    service: str  # the supervisor's name, e.g. rollout-1
    kind: str
    after_step: int
    pid: int = 0
    time: float = 0.0
    step_at_kill: int = 0
    step_at_restart: int = 0
    restarts_before: int = 0
    back_after_s: float = 0.0


class Monkey:
    """Kills the planned services in turn, each after its step and once the one before is back."""

    def __init__(self, st, opts: Options, steps: int) -> None:
        self.st, self.opts = st, opts
        self.rng = random.Random(opts.seed)
        self.kills = [Kill("", kind, 0) for _ in range(opts.rounds) for kind in opts.order]
        self.kills[0].after_step = first_kill_step(steps, self.rng)
        self.stop = threading.Event()
        self.error: str | None = None
        self._tail, self._step = _MetricsTail(st.runs[0].run_dir / "metrics.jsonl"), 0
        self.thread = threading.Thread(target=self._run, name="chaos-monkey", daemon=True)

    def step(self) -> int:
        """The learner's last step row; new lines only are read (`up`'s own metrics tail), not the
        whole file at every poll."""
        for row in self._tail.rows():
            self._step = row["step"]
        return self._step

    def _target(self, kind: str) -> str:
        if kind == "rollout":
            replicas = sorted(n for n in self.st.sup.procs if n.startswith("rollout-"))
            return self.rng.choice(replicas)
        return self.st.runs[0].proc if kind == "learner" else kind

    def _wait(self, cond, timeout_s: float, while_training: bool = False) -> bool:
        """Poll `cond` until true (True), or the timeout, a stop, or (`while_training`) the end
        of training (False)."""
        deadline = time.monotonic() + timeout_s
        learner = self.st.runs[0].proc
        while not self.stop.is_set() and time.monotonic() < deadline:
            if cond():
                return True
            if while_training and self.st.sup.procs[learner].poll() == 0:
                return False
            time.sleep(0.2)
        return False

    def _restarted(self, k: Kill) -> bool:
        return self.st.sup.restarts.get(k.service, 0) > k.restarts_before

    def _back(self, k: Kill) -> bool:
        """Serving again: a replica answers /health; the others by training going on, 3 steps
        past the one at their restart."""
        if k.kind == "rollout":
            import urllib.request

            port = self.st.http_ports[int(k.service.split("-")[1])]
            ctx = stack_ssl(self.st.cfg)
            try:
                with urllib.request.urlopen(f"{'https' if ctx else 'http'}://127.0.0.1:{port}/health", timeout=2,
                                            context=ctx) as r:
                    return r.status == 200
            except OSError:
                return False
        return self.step() >= k.step_at_restart + 3

    def _run(self) -> None:
        from tqdm import tqdm

        say = tqdm.write  # beside up's progress bar, not through it
        try:
            for i, k in enumerate(self.kills):
                if i:
                    k.after_step = self.step() + gap_steps(self.rng)
                if not self._wait(lambda k=k: self.step() >= k.after_step, 3600, while_training=True):
                    return  # training ended first: the kills left are reported as not done
                time.sleep(self.rng.uniform(0.0, 1.0))  # a moment within the step
                k.service = self._target(k.kind)
                k.restarts_before = self.st.sup.restarts.get(k.service, 0)
                proc = self.st.sup.procs[k.service]
                k.pid, k.time, k.step_at_kill = proc.pid, time.time(), self.step()
                os.kill(proc.pid, signal.SIGKILL)
                say(f"chaos: SIGKILL {k.service} (pid {k.pid}) after step {k.step_at_kill}")
                restarted = self._wait(lambda k=k: self._restarted(k), 300)
                k.step_at_restart = self.step()
                if not restarted or not self._wait(lambda k=k: self._back(k), 600):
                    if not self.stop.is_set():
                        self.error = f"{k.service} did not come back after its SIGKILL"
                    return
                k.back_after_s = time.time() - k.time
                say(f"chaos: {k.service} back after {k.back_after_s:.1f} s")
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------- the checks


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, bool(ok), detail))

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def lineage(rows: list[dict]) -> dict[int, dict]:
    """The trained lineage: the last row written for each step (a learner restarted from its
    checkpoint writes the steps since it again)."""
    return {r["step"]: r for r in rows}


def check_steps_and_reward(rows: list[dict], steps: int, report: Report) -> None:
    last = lineage(rows)
    missing = sorted(set(range(1, steps + 1)) - set(last))
    report.add("every step ran", not missing, f"{len(last)} of {steps} steps"
               + (f"; missing {missing[:10]}" if missing else "") + f" ({len(rows) - len(last)} rows redone after a restart)")
    rewards = [last[s]["reward/mean"] for s in sorted(last)]
    first, final = statistics.fmean(rewards[:5]), statistics.fmean(rewards[-5:])
    report.figures.update(reward_first5=first, reward_last5=final)
    report.add("reward rose", final > first, f"first 5 steps {first:.3f}, last 5 steps {final:.3f}")


def check_versions(records: list, rows: list[dict], report: Report) -> None:
    """Broker versions strictly increasing, gap-free within each epoch (an epoch's versions are
    consecutive), epochs never going back, no version twice; every acknowledged version there."""
    versions = [r.version for r in records]
    dup = [v for v, n in Counter(versions).items() if n > 1]
    by_epoch: dict[int, list[int]] = {}
    for r in records:
        by_epoch.setdefault(r.publisher_epoch, []).append(r.version)
    gaps = [e for e, vs in by_epoch.items() if sorted(vs) != list(range(min(vs), max(vs) + 1))]
    order = [r.publisher_epoch for r in sorted(records, key=lambda r: r.version)]
    report.add("versions strictly increasing, none reused", not dup and versions == sorted(versions)
               and versions == list(range(1, len(versions) + 1)) and order == sorted(order),
               f"{len(versions)} versions v1..v{max(versions, default=0)} over {len(by_epoch)} publisher epoch(s)"
               + (f"; reused {dup}" if dup else ""))
    report.add("gap-free within each epoch", not gaps,
               ", ".join(f"epoch {e}: v{min(vs)}-v{max(vs)}" for e, vs in sorted(by_epoch.items()))
               + (f"; gaps in {gaps}" if gaps else ""))
    acked = {r["policy_version"] for r in rows}
    lost = sorted(acked - set(versions))
    report.add("every acknowledged publish present", not lost,
               f"{len(acked)} versions acknowledged to the learner, {len(lost)} missing" + (f": {lost[:10]}" if lost else ""))
    report.figures.update(versions=len(versions), epochs=len(by_epoch))


def check_groups(run_dir: Path, rows: list[dict], report: Report) -> None:
    consumed: dict[int, list[str]] = {}
    path = run_dir / "consumed.jsonl"
    for line in (path.read_text().splitlines() if path.exists() else []):
        if line.strip():
            d = json.loads(line)
            consumed[d["step"]] = d["groups"]
    ids = [g for s in sorted(consumed) for g in consumed[s]]
    twice = [g for g, n in Counter(ids).items() if n > 1]
    report.add("no trajectory group trained twice", bool(ids) and not twice,
               f"{len(ids)} groups in the trained lineage's {len(consumed)} steps, {len(twice)} twice"
               + (f": {twice[:5]}" if twice else ""))
    last = rows[-1] if rows else {}
    counts = {k.split("/", 1)[1]: last.get(k, 0) for k in (
        "leases/groups_leased", "leases/groups_leased_again", "leases/accepted", "leases/already_exists",
        "leases/dropped_stale", "leases/dropped_stale_buffered", "leases/accepted_late", "leases/consumed")}
    report.figures["groups"] = counts
    report.add("every leased group accepted once or leased again",
               counts["consumed"] == len(ids) and counts["accepted"] >= counts["consumed"],
               ", ".join(f"{k} {v}" for k, v in counts.items()) + " (the learner's counters, as of its last checkpoint "
               "restored and run since)")


def check_requests(reqs: list[Request], kills: list[Kill], records: list, adapter: str, report: Report) -> None:
    known = {f"{adapter}@v{r.version}" for r in records}
    windows = [(k.service, k.time, k.time + k.back_after_s if k.back_after_s else float("inf"))
               for k in kills if k.kind == "rollout" and k.time]

    def in_window(q: Request) -> bool:
        return any(name == f"rollout-{q.replica}" and q.t0 <= t1 and q.t1 >= t0 - 0.5 for name, t0, t1 in windows)

    failed = [q for q in reqs if q.outcome not in ("ok", "unreachable")]
    for q in failed:
        q.in_kill_window = in_window(q)
    outside = [q for q in failed if not q.in_kill_window]
    wrong = [q for q in reqs if q.outcome == "ok" and (
        (q.model.endswith("@latest") and q.served.startswith(adapter + "@") and q.served not in known)
        or (not q.model.endswith("@latest") and q.served != q.model))]
    not_retryable = [q for q in failed if q.outcome not in RETRYABLE]
    statuses = Counter(q.outcome for q in reqs)
    report.figures["requests"] = {"total": len(reqs), "by_outcome": dict(statuses),
                                  "failure_details": dict(Counter(f"{q.outcome} {q.detail}" for q in failed).most_common(8)),
                                  "failed": len(failed), "failed_outside_a_killed_replica": len(outside),
                                  "wrong_version": len(wrong)}
    report.add("inference: only requests on a killed replica failed", not outside,
               f"{len(reqs)} requests: " + ", ".join(f"{k} {v}" for k, v in statuses.most_common())
               + f"; {len(failed)} failed, {len(outside)} of them outside a killed replica's window"
               + (f" ({Counter(q.outcome for q in outside).most_common()})" if outside else ""))
    report.add("inference: failures retryable", not not_retryable,
               f"{len(not_retryable)} with a status a client should not retry"
               + (f": {Counter(q.outcome for q in not_retryable).most_common()}" if not_retryable else ""))
    report.add("inference: no wrong version", bool(reqs) and not wrong,
               f"{len(wrong)} answers from a version not committed or not the one pinned")


def check_cleanup(run_dir: Path, scratch: Path, shm_before: set[str], report: Report) -> None:
    logs = run_dir / "logs"
    pids = set(json.loads((logs / "pids.json").read_text()).values()) if (logs / "pids.json").exists() else set()
    if (logs / "restarts.jsonl").exists():
        pids |= {json.loads(x)["pid"] for x in (logs / "restarts.jsonl").read_text().splitlines()
                 if x.strip() and "pid" in json.loads(x)}
    alive = []
    for pid in sorted(pids):
        try:
            os.killpg(pid, 0)  # the group: a service and anything it started (vLLM's engine)
            alive.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    report.add("every process stopped", not alive, f"{len(pids)} service processes started, "
               f"{len(alive)} process groups still alive" + (f": {alive}" if alive else ""))
    left = [str(p) for p in scratch.rglob("*")] + [str(scratch)] if scratch.exists() else []
    shm_left = sorted(_shm() - shm_before)
    report.add("no scratch files left", not left and not shm_left,
               f"{len(left)} under {scratch}, {len(shm_left)} new in /dev/shm" + (f": {(left + shm_left)[:5]}" if
                                                                                   left or shm_left else ""))


def _shm() -> set[str]:
    try:
        return {p.name for p in Path("/dev/shm").iterdir() if p.stat().st_uid == os.getuid()}
    except OSError:
        return set()


def print_report(report: Report, kills: list[Kill]) -> None:
    print("\nchaos report")
    for k in kills:
        back = f"back after {k.back_after_s:5.1f} s" if k.back_after_s else "not back by the end" if k.time else "not done"
        print(f"  SIGKILL {k.service or k.kind:<10} after step {k.step_at_kill:<4} {back}")
    width = max(len(c.name) for c in report.checks)
    for c in report.checks:
        print(f"  [{'ok' if c.ok else 'FAIL'}] {c.name:<{width}}  {c.detail}")
    print("chaos: every check passed" if report.ok else "chaos: SOME CHECKS FAILED", flush=True)


# ---------------------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(HELP)
        return 0
    from services.stack import Hooks, load_stack_config, run

    argv, opts = take_options(argv)
    config = argv[:1] if argv and not argv[0].startswith("--") else []
    cfg, print_only = load_stack_config([*config, *CHAOS_DEFAULTS, *argv[len(config):]])
    if print_only:
        return 0
    if cfg.runs:
        raise SystemExit("loraloop chaos: one run at a time (no [[runs]])")
    if cfg.rollout.tls.enabled and not cfg.tls.enabled:  # its probes and clients trust the stack's CA only
        raise SystemExit("loraloop chaos: TLS through the stack's [tls] only (not rollout.tls)")
    if cfg.rollout_replicas < 1 and "rollout" in opts.order:
        raise SystemExit("loraloop chaos: killing a replica needs rollout_replicas >= 1")
    run_dir = Path(cfg.run_dir).resolve()
    for stale in ("metrics.jsonl", "consumed.jsonl", "val_metrics.jsonl", "chaos.json"):
        (run_dir / stale).unlink(missing_ok=True)
    if (run_dir / "checkpoints").exists():
        import shutil

        shutil.rmtree(run_dir / "checkpoints")  # a fresh run: resume is the faults' business only
    (run_dir / "logs" / "restarts.jsonl").unlink(missing_ok=True)
    steps, adapter = cfg.learner.steps, cfg.learner.adapter_name
    shm_before = _shm()
    report = Report()
    state: dict[str, Any] = {}

    def started(st) -> None:
        state["st"] = st
        state["monkey"] = m = Monkey(st, opts, steps)
        m.thread.start()
        if opts.clients and st.http_ports:
            state["clients"] = c = Clients(st.openai_urls(), st.tokens["client"], adapter, opts.clients, opts.seed,
                                           ssl_context=stack_ssl(st.cfg))
            c.start()
        print(f"chaos: seed {opts.seed}; killing {', '.join(k.kind for k in m.kills)} in turn, the first after "
              f"step {m.kills[0].after_step}, each next a few steps after the one before is back; "
              f"{opts.clients} OpenAI client(s)", flush=True)

    def finished(st) -> None:
        from services.broker.client import BrokerClient
        from services.learner.metrics import read_metrics

        m: Monkey = state["monkey"]
        # Training is over; the stack still runs: the last service killed may still be on its way
        # back. The clients stop first: on 2 cores a replica starting beside one that serves them
        # (same core) waits minutes for CPU; alone it starts in ~45 s.
        if "clients" in state:
            state["clients"].close()
        m.thread.join(BACK_AFTER_TRAINING_S)
        stopping()
        report.add("every planned kill done", m.error is None and all(k.time for k in m.kills),
                   m.error or f"{sum(1 for k in m.kills if k.time)} of {len(m.kills)}: "
                   + ", ".join(k.service for k in m.kills))
        rows = read_metrics(run_dir)
        check_steps_and_reward(rows, steps, report)
        with BrokerClient(st.broker, st.tokens["client"], tls=st.cfg.tls.client() if st.cfg.tls.enabled else None) as client:
            records, _ = client.list_versions(adapter)
        check_versions(records, rows, report)
        check_groups(run_dir, rows, report)
        if "clients" in state:
            check_requests(state["clients"].requests, m.kills, records, adapter, report)

    def stopping() -> None:
        if "monkey" in state:
            state["monkey"].stop.set()
            state["monkey"].thread.join(10)
        if "clients" in state:
            state["clients"].close()  # idempotent

    code = run(cfg, Hooks(started=started, finished=finished, stopping=stopping))
    if code != 0 or "monkey" not in state:
        print(f"loraloop chaos: the run itself failed (exit code {code})", file=sys.stderr)
        return code or 1
    check_cleanup(run_dir, state["st"].sup.scratch, shm_before, report)
    kills = state["monkey"].kills
    print_report(report, kills)
    for what, n in report.figures.get("requests", {}).get("failure_details", {}).items():
        print(f"  failed request: {n} x {what}")
    (run_dir / "chaos.json").write_text(json.dumps(
        {"seed": opts.seed, "kills": [asdict(k) for k in kills], "checks": [asdict(c) for c in report.checks],
         "figures": report.figures}, indent=1))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
