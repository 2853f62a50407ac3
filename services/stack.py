"""`loraloop up [CONFIG]`: the whole loop as local processes, the way a user first meets it.

With no CONFIG it runs the tiny arithmetic demo: builds (and warm-starts) the tiny model on
first run, starts redis-server (own port, data dir and password under the run dir, AOF
fsync always), the broker, the learner (under torchrun when it has several ranks) and R
rollout replicas, waits on their health checks, shows one progress bar, replaces a rollout
replica that dies, and stops every process it started (by pid) at the end or on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.common import redis_server
from services.common.config import config_cli, to_toml
from services.common.net import free_port
from services.stack_config import ALIASES, StackConfig


@dataclass
class Supervisor:
    """Starts named processes, checks they stay up, stops them all (reverse order) by pid."""

    log_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    specs: dict[str, tuple] = field(default_factory=dict)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None,
              cpus: set[int] | None = None) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=pin,
                                    start_new_session=True)  # Ctrl-C reaches us, not the children
        self.procs[name], self.specs[name] = proc, (args, env, cpus)
        pids = {n: p.pid for n, p in self.procs.items()}
        (self.log_dir / "pids.json").write_text(json.dumps(pids))  # for people and tests
        return proc

    def restart(self, name: str) -> subprocess.Popen:
        self.reap_group(name)  # a killed rollout leaves vLLM's engine processes behind
        args, env, cpus = self.specs[name]
        return self.start(name, args, env, cpus)

    def reap_group(self, name: str, grace_s: float = 10.0) -> None:
        """End whatever is left in the process's group (its session: it was started with
        start_new_session, so the group id is its pid), e.g. orphaned engine processes."""
        pgid = self.procs[name].pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                return
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                try:
                    os.killpg(pgid, 0)
                except (ProcessLookupError, PermissionError):
                    return
                time.sleep(0.1)

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]

    def log_tail(self, name: str, lines: int = 15) -> str:
        return "\n".join((self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])

    def stop(self, name: str, timeout_s: float = 20.0) -> None:
        p = self.procs.get(name)
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if p is not None:
            self.reap_group(name)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


def wait_healthy(target: str, sup: Supervisor, names: list[str], timeout_s: float) -> None:
    from services.common import net

    def exited() -> str | None:
        for n in names:
            if sup.procs[n].poll() is not None:
                return f"{n} exited with code {sup.procs[n].returncode}:\n{sup.log_tail(n)}"
        return None

    try:
        net.wait_healthy(target, timeout_s, exited)
    except TimeoutError:
        raise RuntimeError(f"{', '.join(names)} not healthy after {timeout_s:.0f}s (logs in {sup.log_dir})") from None


def prepare_model(cfg: StackConfig, run_dir: Path) -> Path:
    """The user's model, or the tiny model built (and warm-started) once under the run dir."""
    if cfg.model:
        return Path(cfg.model).resolve()
    model = run_dir / "model"
    if (model / "loraloop_model.json").is_file():
        return model
    from services.common.tiny_model import make_tiny_model

    print(f"building the tiny model in {model} ...", flush=True)
    tmp = run_dir / ".model-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    make_tiny_model(tmp, seed=cfg.seed)
    if cfg.warm_start:
        from services.common.warm_start import warm_start

        print("warm-starting it on the arithmetic task (until RL has signal) ...", flush=True)
        summary = warm_start(tmp, target=cfg.warm_start_target, seed=cfg.seed)
        print(f"  {summary['steps']} steps, sampled exact match {summary['sampled_exact_match']:.2f}", flush=True)
    os.replace(tmp, model)
    return model


@dataclass
class Stack:
    cfg: StackConfig
    run_dir: Path
    sup: Supervisor
    tokens: dict[str, str]
    env: dict[str, str]
    broker: str = ""
    learner: str = ""
    rollout_args: list[str] = field(default_factory=list)
    http_ports: list[int] = field(default_factory=list)

    def service_env(self, role: str) -> dict[str, str]:
        return {**self.env, "LORALOOP_TOKEN": self.tokens[role]}

    def start_rollout(self, k: int) -> str:
        """Replica k, with its gRPC port and its HTTP (OpenAI API) port `http_ports[k]`."""
        name = f"rollout-{k}"
        env = {**self.service_env("rollout"), "VLLM_CPU_OMP_THREADS_BIND": self.cfg.rollout_cpu_bind}
        http = ["--http.port", str(self.http_ports[k])] if self.cfg.rollout.http.enabled else []
        self.sup.start(name, [*self.rollout_args, "--port", str(free_port()), *http, f"--worker_id={name}"], env)
        return name

    def openai_urls(self) -> list[str]:
        scheme = "https" if self.cfg.rollout.tls.enabled else "http"
        return [f"{scheme}://127.0.0.1:{p}/v1" for p in self.http_ports]


def learner_cpus(cfg: StackConfig) -> set[int] | None:
    """The cores not given to the local rollout engines (None: no pinning)."""
    allowed = os.sched_getaffinity(0)
    try:
        engine = {int(c) for part in cfg.rollout_cpu_bind.split(",") for c in
                  (range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))}
    except ValueError:  # "auto" / "nobind": let the OS place things
        return None
    rest = allowed - engine
    return rest or None


def start_stack(cfg: StackConfig, run_dir: Path, model: Path, sup: Supervisor) -> Stack:
    tokens = {role: secrets.token_urlsafe(24) for role in ("learner", "rollout", "client")}
    password = secrets.token_hex(16)
    env = {**os.environ, "LORALOOP_TOKENS": ",".join(f"{r}:{t}" for r, t in tokens.items()),
           "LORALOOP_REDIS_PASSWORD": password, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    st = Stack(cfg, run_dir, sup, tokens, env)
    py = [sys.executable, "-m", "services.cli"]
    # Redis
    redis_port = free_port()
    sup.start("redis", redis_server.command(redis_port, run_dir / "redis", password=password))
    try:
        redis_server.wait_ready(redis_port, password=password, exited=lambda: sup.procs["redis"].poll() is not None)
    except RuntimeError:
        raise RuntimeError(f"redis did not start:\n{sup.log_tail('redis')}") from None
    # Broker
    b = cfg.broker.model_copy(deep=True)
    b.server.port, b.redis.url = free_port(), f"redis://127.0.0.1:{redis_port}/0"
    (run_dir / "broker.toml").write_text(to_toml(b.model_dump()))
    sup.start("broker", [*py, "broker", str(run_dir / "broker.toml")], env)
    st.broker = f"127.0.0.1:{b.server.port}"
    wait_healthy(st.broker, sup, ["broker"], 60)
    # Learner
    lc = cfg.learner.model_copy(deep=True)
    lc.model.path, lc.broker, lc.run_dir, lc.seed = str(model), st.broker, str(run_dir), cfg.seed
    lc.server.port = free_port()
    (run_dir / "learner.toml").write_text(to_toml(lc.model_dump()))
    sup.start("learner", [*py, "learner", str(run_dir / "learner.toml")], st.service_env("learner"),
              cpus=learner_cpus(cfg))
    st.learner = f"127.0.0.1:{lc.server.port}"
    # Rollouts (a file for replicas started by hand too)
    rc = cfg.rollout.model_copy(deep=True)
    rc.engine.model, rc.broker, rc.learner = str(model), st.broker, st.learner
    rc.engine.max_lora_rank = max(rc.engine.max_lora_rank, lc.model.lora_rank)
    rc.engine.max_model_len = max(64, min(rc.engine.max_model_len, 512))
    rc.adapters.follow = sorted({*rc.adapters.follow, lc.adapter_name})
    rc.http.port = 0  # a replica started by hand from rollout.toml picks a free port (up gives its own theirs)
    (run_dir / "rollout.toml").write_text(to_toml(rc.model_dump()))
    st.rollout_args = [*py, "rollout", str(run_dir / "rollout.toml")]
    st.http_ports = [free_port() for _ in range(cfg.rollout_replicas)]
    env_file = run_dir / "stack.env"
    env_file.touch(mode=0o600)
    env_file.chmod(0o600)
    openai = (f"OPENAI_BASE_URL={st.openai_urls()[0]}\nOPENAI_API_KEY={tokens['client']}\n"
              f"LORALOOP_OPENAI_URLS={','.join(st.openai_urls())}\n"
              if cfg.rollout.http.enabled and st.http_ports else "")
    env_file.write_text(
        f"LORALOOP_BROKER={st.broker}\nLORALOOP_LEARNER={st.learner}\n"
        f"LORALOOP_TOKEN={tokens['learner']}\nLORALOOP_ROLLOUT_TOKEN={tokens['rollout']}\n"
        f"LORALOOP_CLIENT_TOKEN={tokens['client']}\n{openai}")
    wait_healthy(st.learner, sup, ["learner"], 300)
    for k in range(cfg.rollout_replicas):
        st.start_rollout(k)
    return st


def _summary(run_dir: Path, wall_s: float) -> dict:
    from services.learner.metrics import read_metrics

    rows = read_metrics(run_dir)
    rewards = [r["reward/mean"] for r in rows]
    first = sum(rewards[:5]) / max(1, len(rewards[:5]))
    last = sum(rewards[-5:]) / max(1, len(rewards[-5:]))
    out = {"steps": len(rows), "reward_first5": first, "reward_last5": last, "wall_s": wall_s}
    (run_dir / "summary.json").write_text(json.dumps(out, indent=1))
    return out


def follow_progress(st: Stack, total: int) -> None:
    """One progress bar from the learner's metrics; replaces dead rollout replicas."""
    from tqdm import tqdm

    metrics = st.run_dir / "metrics.jsonl"
    offset = metrics.stat().st_size if metrics.exists() else 0
    done = 0
    with tqdm(total=total, desc="training", unit="step", dynamic_ncols=True) as bar:
        while True:
            if metrics.exists():
                with open(metrics) as f:
                    f.seek(offset)
                    chunk = f.read()
                    complete = chunk[: chunk.rfind("\n") + 1]
                    offset += len(complete.encode())
                for line in complete.splitlines():
                    r = json.loads(line)
                    bar.n = done = r["step"]
                    bar.set_postfix({"v": r["policy_version"], "reward": f"{r['reward/mean']:.3f}",
                                     "tok/s": f"{r.get('perf/tokens_per_s', 0):.0f}",
                                     "stale": f"{r.get('staleness/mean', 0):.2f}"}, refresh=False)
                    bar.refresh()
            learner = st.sup.procs["learner"]
            if learner.poll() is not None:
                if learner.returncode != 0:
                    raise RuntimeError(f"learner exited with code {learner.returncode}:\n{st.sup.log_tail('learner')}")
                if done >= total or not metrics.exists():
                    return
            for name in st.sup.dead():
                if name.startswith("rollout-"):
                    tqdm.write(f"{name} exited (code {st.sup.procs[name].returncode}); starting a replacement")
                    st.sup.restart(name)
                elif name != "learner":
                    raise RuntimeError(f"{name} exited:\n{st.sup.log_tail(name)}")
            time.sleep(0.5)


def main(argv: list[str]) -> int:
    cfg = config_cli(StackConfig, argv, "loraloop up",
                     "The local stack: Redis, broker, learner and rollout replicas as processes on this\n"
                     "machine. With no CONFIG: the tiny arithmetic demo (builds and warm-starts the tiny\n"
                     "model on first run) that visibly learns on 2 CPU cores; see examples/ for others.",
                     ALIASES)
    try:
        redis_server.require()
    except RuntimeError as e:
        print(f"loraloop up: {e}", file=sys.stderr)
        return 1
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    sup = Supervisor(run_dir / "logs")
    t0 = time.monotonic()
    try:
        model = prepare_model(cfg, run_dir)
        print("starting redis, broker, learner ...", flush=True)
        st = start_stack(cfg, run_dir, model, sup)
        print(f"broker {st.broker}, learner {st.learner}; {cfg.rollout_replicas} rollout replica(s) starting "
              f"(vLLM engine start takes ~30 s); logs in {sup.log_dir}/\n"
              f"more replicas: source {run_dir}/stack.env && LORALOOP_TOKEN=$LORALOOP_ROLLOUT_TOKEN "
              f"loraloop rollout {run_dir}/rollout.toml --port 0 --http-port 0", flush=True)
        if st.http_ports:
            print(f"OpenAI API (while it trains): {', '.join(st.openai_urls())} -- `source {run_dir}/stack.env` "
                  f"sets OPENAI_BASE_URL and OPENAI_API_KEY; model \"{cfg.learner.adapter_name}@latest\", "
                  f"\"{cfg.learner.adapter_name}@vN\" or \"{model}\" (the base)", flush=True)
        follow_progress(st, cfg.learner.steps)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 130
    except RuntimeError as e:
        print(f"loraloop up: {e}", file=sys.stderr)
        return 1
    finally:
        sup.stop_all()
    s = _summary(run_dir, time.monotonic() - t0)
    print(f"done: {s['steps']} steps in {s['wall_s']:.0f} s; mean reward first 5 steps {s['reward_first5']:.3f}, "
          f"last 5 steps {s['reward_last5']:.3f}", flush=True)
    if cfg.plot and s["steps"]:
        from services.plot import plot_run

        print(f"curves: {plot_run(run_dir)}", flush=True)
    print("every process stopped", flush=True)
    return 0
