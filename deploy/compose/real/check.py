"""The compose stack run for real, checked from the host (deploy/compose/real/run.sh runs it).

On a Docker daemon run.sh started (no network of its own: every service on the host's loopback
through compose.hostnet.yaml), this drives `docker compose` as a user would and checks:

- `up --build --scale rollout=2` creates no container network;
- the learner trains (every step ran, reward rose: first/last 5-step means), and
  `loraloop adapters list` from the host sees the broker's versions;
- each service's main process SIGKILLed once (its host pid from `docker inspect`; `docker kill`
  would count as a manual stop, which restart policies ignore): Redis, the broker, the learner,
  one rollout replica, each only after the one before is back; each comes back by its restart
  policy (RestartCount up, a new pid, healthy again) and the run goes on;
- the chaos run's checks (services/chaos.py): versions strictly increasing, gap-free per
  publisher epoch, none reused, every acknowledged publish still there after the Redis kill; no
  trajectory group trained twice; OpenAI-API clients (the official `openai` client, chaos's
  Clients) querying both replicas throughout: only requests in flight on the killed replica
  fail, each with a retryable status, and none is answered by a wrong version (a replica comes
  back on a new port, port 0: requests to its old one are refused, counted as unreachable);
- `docker compose down -v --rmi all` leaves no container, volume, network or image it made.

With `--tls-dir` (a directory made by deploy/compose/make-certs.sh), compose.tls.yaml is added:
every gRPC server and the OpenAI API speak TLS, the checks' clients verify them with its CA, and
one more check: a plain-text client is refused by the broker, the learner and a replica.

Exit code 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from services.broker.client import BrokerClient
from services.chaos import (
    Clients,
    Report,
    check_groups,
    check_requests,
    check_steps_and_reward,
    check_versions,
    lineage,
)
from services.chaos import Kill as ChaosKill
from services.learner.metrics import read_metrics

ORDER = ("broker", "redis", "learner", "rollout")  # services/chaos.py's order: a replica last
FIRST_KILL_STEP = 15
STEPS_BETWEEN_KILLS = 10
BACK_TIMEOUT_S = 600


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()[-2000:]}")
    return r.stdout


@dataclass
class Stack:
    compose_dir: Path
    files: list[str]
    env_file: str
    project: str = "loraloop"

    def compose(self, *args: str, timeout: float = 120, check: bool = True, stream: bool = False) -> str:
        argv = ["docker", "compose", "--env-file", self.env_file, *(a for f in self.files for a in ("-f", f)), *args]
        if stream:  # builds: their output goes to our stdout as it comes
            r = subprocess.run(argv, cwd=self.compose_dir, timeout=timeout)
            out = ""
        else:
            r = subprocess.run(argv, cwd=self.compose_dir, capture_output=True, text=True, timeout=timeout)
            out = r.stdout
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[2:])}: exit {r.returncode}: {(r.stderr or '')[-3000:]}")
        return out

    def containers(self, service: str) -> list[dict]:
        ids = self.compose("ps", "-a", "-q", service).split()
        return json.loads(docker("inspect", *ids)) if ids else []

    def volume_path(self, name: str) -> Path:
        return Path(docker("volume", "inspect", "-f", "{{.Mountpoint}}", f"{self.project}_{name}").strip())


@dataclass
class Kill:
    service: str
    container: str = ""
    pid: int = 0
    restarts_before: int = 0
    step_at_kill: int = 0
    time: float = 0.0
    back_after_s: float | None = None
    new_pid: int = 0
    restarts_after: int = 0


def openai_url(container: str) -> str | None:
    """The replica's OpenAI API address, from the line it prints once it serves (port 0)."""
    out = subprocess.run(["docker", "logs", container], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=60).stdout
    for line in out.splitlines()[::-1]:
        if line.startswith(("OpenAI API on http://", "OpenAI API on https://")):
            return line.split()[3]
    return None


def tls_only(broker: str, learner: str, openai: str, ca: Path) -> tuple[bool, str]:
    """Each server answers a client that verifies it with `ca`, and not a plain-text one."""
    import ssl
    import urllib.request

    import grpc
    from grpc_health.v1 import health_pb2 as h
    from grpc_health.v1 import health_pb2_grpc as g

    creds = grpc.ssl_channel_credentials(ca.read_bytes())
    seen = []
    for name, target in (("broker", broker), ("learner", learner)):
        with grpc.secure_channel(target, creds) as ch:
            tls_ok = g.HealthStub(ch).Check(h.HealthCheckRequest(), timeout=10).status == h.HealthCheckResponse.SERVING
        with grpc.insecure_channel(target) as ch:
            try:
                g.HealthStub(ch).Check(h.HealthCheckRequest(), timeout=5)
                plain = "answered"
            except grpc.RpcError as e:
                plain = e.code().name
        seen.append((name, tls_ok, plain != "answered", f"{name}: TLS {'SERVING' if tls_ok else 'no'}, plain {plain}"))
    health = openai.removesuffix("/v1") + "/health"
    with urllib.request.urlopen(health, timeout=10, context=ssl.create_default_context(cafile=str(ca))) as r:
        https_ok = r.status == 200
    try:
        urllib.request.urlopen(health.replace("https://", "http://", 1), timeout=10).close()
        plain = "answered"
    except OSError as e:
        plain = type(e).__name__
    seen.append(("rollout", https_ok, plain != "answered", f"replica: HTTPS {'200' if https_ok else 'no'}, plain HTTP {plain}"))
    return all(t and p for _, t, p, _ in seen), "; ".join(d for *_, d in seen)


def inventory() -> dict[str, set[str]]:
    return {"containers": set(docker("ps", "-a", "-q").split()),
            "volumes": set(docker("volume", "ls", "-q").split()),
            "networks": set(docker("network", "ls", "--format", "{{.Name}}").split()),
            "images": set(docker("images", "-a", "--format", "{{.Repository}}:{{.Tag}}").split())}


class Run:
    def __init__(self, stack: Stack, steps: int) -> None:
        self.stack, self.steps = stack, steps
        self.run_dir: Path | None = None

    def rows(self) -> list[dict]:
        if self.run_dir is None:
            self.run_dir = self.stack.volume_path("runs") / "learner"
        return read_metrics(self.run_dir)

    def step(self) -> int:
        rows = self.rows()
        return max((r["step"] for r in rows), default=0)

    def wait(self, what: str, cond, timeout: float, poll: float = 1.0) -> float:
        t0 = time.time()
        while not cond():
            if time.time() - t0 > timeout:
                raise TimeoutError(f"{what}: not within {timeout:.0f} s")
            time.sleep(poll)
        return time.time() - t0

    def learner_done(self) -> bool:
        c = self.stack.containers("learner")
        return bool(c) and c[0]["State"]["Status"] == "exited" and c[0]["State"]["ExitCode"] == 0

    def kill(self, k: Kill) -> None:
        c = self.stack.containers(k.service)
        live = [x for x in c if x["State"]["Running"] and x["State"]["Pid"]]
        if not live:
            raise RuntimeError(f"{k.service}: no running container to kill ({[x['State']['Status'] for x in c]})")
        x = live[0]
        k.container, k.pid, k.restarts_before = x["Name"].lstrip("/"), x["State"]["Pid"], x["RestartCount"]
        k.step_at_kill, k.time = self.step(), time.time()
        os.kill(k.pid, signal.SIGKILL)
        say(f"SIGKILL {k.container} (host pid {k.pid}, RestartCount {k.restarts_before}) after step {k.step_at_kill}")

    def back(self, k: Kill) -> bool:
        x = json.loads(docker("inspect", k.container))[0]
        st = x["State"]
        healthy = st.get("Health", {}).get("Status", "healthy") == "healthy"
        if x["RestartCount"] > k.restarts_before and st["Running"] and st["Pid"] not in (0, k.pid) and healthy:
            k.new_pid, k.restarts_after = st["Pid"], x["RestartCount"]
            return True
        return False


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compose-dir", required=True, type=Path)
    ap.add_argument("--env-file", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--clients", type=int, default=2, help="OpenAI-API clients querying the replicas throughout")
    ap.add_argument("--keep-images", default="", help="comma-separated images the caller made (kept by down)")
    ap.add_argument("--rmi", default="all", choices=["all", "none"],
                    help="none: keep the built images at the end (to run again without rebuilding; the last check then fails)")
    ap.add_argument("--broker", required=True, help="host:port of the broker on the host's loopback")
    ap.add_argument("--learner", default="", help="host:port of the learner on the host's loopback (the TLS check)")
    ap.add_argument("--tls-dir", type=Path, help="certificates from make-certs.sh: run with compose.tls.yaml")
    a = ap.parse_args(argv)
    ca = a.tls_dir / "ca.pem" if a.tls_dir else None
    # The client token from the env file (not the command line, which other users can read).
    secrets = dict(x.split("=", 1) for x in Path(a.env_file).read_text().splitlines() if "=" in x)
    client_token = secrets["LORALOOP_CLIENT_TOKEN"]
    stack = Stack(a.compose_dir, ["compose.yaml", *(["compose.tls.yaml"] if ca else []), "real/compose.hostnet.yaml"],
                  a.env_file)
    report = Report()
    before = inventory()
    say(f"before: {len(before['containers'])} containers, {len(before['volumes'])} volumes, "
        f"networks {sorted(before['networks'])}, images {sorted(before['images'])}")
    t0 = time.time()
    clients: Clients | None = None
    try:
        say(f"docker compose up --build --detach --scale rollout={a.replicas}")
        stack.compose("up", "--build", "--detach", "--scale", f"rollout={a.replicas}", timeout=3600, stream=True)
        say(f"up returned after {time.time() - t0:.0f} s")
        networks = set(docker("network", "ls", "--format", "{{.Name}}").split())
        report.add("no container network created", networks == before["networks"],
                   f"networks after up: {sorted(networks)} (before: {sorted(before['networks'])})")
        modes = {x["Name"].lstrip("/"): x["HostConfig"]["NetworkMode"]
                 for s in ("redis", "broker", "learner", "rollout") for x in stack.containers(s)}
        report.add("every service on the host's network", set(modes.values()) == {"host"}
                   and len([n for n in modes if "rollout" in n]) == a.replicas,
                   ", ".join(f"{n}: {m}" for n, m in sorted(modes.items())))
        run = Run(stack, a.steps)
        replicas = sorted(x["Name"].lstrip("/") for x in stack.containers("rollout"))
        urls: dict[str, str | None] = dict.fromkeys(replicas)

        def serving() -> bool:
            for r in replicas:
                urls[r] = urls[r] or openai_url(r)
            return all(urls.values())

        run.wait("both replicas serving the OpenAI API", serving, BACK_TIMEOUT_S, poll=2)
        if ca:
            ok, detail = tls_only(a.broker, a.learner, urls[replicas[0]], ca)
            report.add("TLS only: every server verified with the CA, plain text refused", ok, detail)
        say(f"OpenAI API: {urls}; {a.clients} client(s) querying policy@latest (and versions seen, pinned)")
        ctx = None
        if ca:
            import ssl

            ctx = ssl.create_default_context(cafile=str(ca))
        clients = Clients([urls[r] for r in replicas], client_token, "policy", a.clients, seed=0, ssl_context=ctx)
        clients.start()
        kills = [Kill(s) for s in ORDER]
        next_step = FIRST_KILL_STEP
        t_train = time.time()
        for k in kills:
            run.wait(f"step {next_step} before killing {k.service}", lambda n=next_step: run.step() >= n or run.learner_done(),
                     BACK_TIMEOUT_S)
            if run.learner_done():
                say(f"training ended before the {k.service} kill")
                break
            run.kill(k)
            try:
                k.back_after_s = run.wait(f"{k.service} back after its SIGKILL", lambda k=k: run.back(k), BACK_TIMEOUT_S)
            except TimeoutError as e:
                say(f"{e}; no further kills")
                break
            say(f"{k.container} back after {k.back_after_s:.1f} s (RestartCount {k.restarts_after}, "
                f"new host pid {k.new_pid}); learner at step {run.step()}")
            next_step = run.step() + STEPS_BETWEEN_KILLS
        run.wait("the learner's last step", run.learner_done, 1800, poll=2)
        say(f"learner exited 0 after {time.time() - t_train:.0f} s of training")
        clients.close()
        report.add("every service SIGKILLed once came back by its restart policy",
                   all(k.back_after_s is not None for k in kills),
                   "; ".join(f"{k.service} ({k.container}) pid {k.pid} -> {k.new_pid}, RestartCount "
                             f"{k.restarts_before} -> {k.restarts_after}, after step {k.step_at_kill}, back in "
                             f"{k.back_after_s:.1f} s" if k.back_after_s is not None else f"{k.service}: not done"
                             for k in kills))
        rows = run.rows()
        check_steps_and_reward(rows, a.steps, report)
        after_kills = [r for r in lineage(rows).values() if r["step"] > max(k.step_at_kill for k in kills)]
        report.add("the run went on after the last kill", bool(after_kills),
                   f"{len(after_kills)} steps trained after the last SIGKILL")
        with BrokerClient(a.broker, client_token, tls_ca_file=str(ca) if ca else None) as client:
            records, _ = client.list_versions("policy")
        check_versions(records, rows, report)
        check_groups(run.run_dir, rows, report)
        # chaos's request check names a killed replica rollout-<index in the clients' list>.
        check_requests(clients.requests, [ChaosKill(f"rollout-{replicas.index(k.container)}", "rollout", 0, k.pid, k.time,
                                                    back_after_s=k.back_after_s or 0.0)
                                          for k in kills if k.service == "rollout" and k.container in replicas],
                       records, "policy", report)
        env = {**os.environ, "LORALOOP_BROKER": a.broker, "LORALOOP_TOKEN": client_token,
               **({"LORALOOP_TLS_CA": str(ca)} if ca else {})}
        listed = subprocess.run([sys.executable, "-m", "services.cli", "adapters", "list", "policy"],
                                capture_output=True, text=True, env=env, timeout=60)
        lines = [x for x in listed.stdout.splitlines() if x.strip()]
        print(f"  $ LORALOOP_BROKER={a.broker} LORALOOP_TOKEN=<client token> loraloop adapters list policy")
        for x in (lines if len(lines) <= 8 else [*lines[:4], "...", *lines[-3:]]):
            print("    " + x)
        shown = [x for x in lines if x.startswith("v") and x.split()[0][1:].isdigit()]
        latest = records[-1].version if records else None
        report.add("loraloop adapters list from the host sees the versions",
                   listed.returncode == 0 and bool(records) and len(shown) == len(records)
                   and f"latest: v{latest}" in lines,
                   f"exit {listed.returncode}: {len(shown)} versions listed, latest v{latest} "
                   f"(the broker's ListVersions: {len(records)})"
                   + (f"; stderr {listed.stderr.strip()[-300:]}" if listed.returncode else ""))
        restarts = {x["Name"].lstrip("/"): x["RestartCount"] for s in ("redis", "broker", "learner", "rollout")
                    for x in stack.containers(s)}
        say(f"restart counts at the end: {restarts}")
    except Exception as e:  # reported as a failed check; the stack still goes down
        report.add("the run itself", False, f"{type(e).__name__}: {e}")
        for s in ("redis", "broker", "learner", "rollout"):
            print(f"--- logs of {s} (tail)", flush=True)
            stack.compose("logs", "--no-color", "--tail", "40", s, check=False, stream=True)
    finally:
        if clients is not None:
            clients.close()
        rmi = ["--rmi", "all"] if a.rmi == "all" else []
        say(f"docker compose down --volumes {' '.join(rmi)} --remove-orphans")
        stack.compose("down", "--volumes", *rmi, "--remove-orphans", "--timeout", "20", timeout=1200, check=False)
        after = inventory()
        keep = {x for x in a.keep_images.split(",") if x}
        left = {k: sorted(after[k] - (before[k] | (keep if k == "images" else set()))) for k in after}
        report.add("down leaves no container, volume, network or image the run made", not any(left.values()),
                   ", ".join(f"{k} {len(after[k])}" for k in after) + f" (images kept: the base images the caller made: "
                   f"{sorted(after['images'] & keep)})" + (f"; left: {left}" if any(left.values()) else ""))
    width = max(len(c.name) for c in report.checks)
    print("\ncompose stack report")
    for c in report.checks:
        print(f"  [{'ok' if c.ok else 'FAIL'}] {c.name:<{width}}  {c.detail}")
    print(f"compose stack: {'every check passed' if report.ok else 'SOME CHECKS FAILED'} "
          f"({time.time() - t0:.0f} s from up to down)", flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
