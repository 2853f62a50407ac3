"""`python -m deploy.ray.launcher`: the loraloop services as Ray actors, on a local Ray or a cluster.

    redis-server (or --redis-url) -> broker -> learner ranks (one placement group) and rollout
    replicas -> wait for the learner's last step -> stop everything, in reverse -> ray.shutdown()

The actors (deploy/ray/actors.py) run the same code as `loraloop broker|rollout|learner`; this
module places them, waits on their health checks and supervises them. The command line and
the configs are settled first (deploy/ray/plan.py), before Ray is imported.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

from deploy.ray.plan import Plan, make_plan, merge, parser, write_env_file


class Launch:
    """The running deployment: actor handles by name, their pids, the learner placement group."""

    def __init__(self, plan: Plan) -> None:
        import ray

        from deploy.ray import actors

        self.ray, self.actors_mod, self.plan = ray, actors, plan
        self.prefix = f"loraloop-{secrets.token_hex(3)}"
        self.actors: dict[str, Any] = {}
        self.pids: dict[str, list[int]] = {}
        self.targets: dict[str, str] = {}
        self.pg = None
        self.deadline = None if plan.args.timeout is None else time.monotonic() + plan.args.timeout

    # ------------------------------------------------------------------ helpers

    def _stage_deadline(self) -> float:
        d = time.monotonic() + self.plan.args.start_timeout
        return d if self.deadline is None else min(d, self.deadline)

    def _options(self, name: str, role: str, **opts: Any) -> dict[str, Any]:
        return {"name": f"{self.prefix}-{name}", "runtime_env": {"env_vars": self.plan.env[role]}, **opts}

    def _record_pids(self, name: str) -> None:
        try:
            pids = self.ray.get(self.actors[name].pids.remote(), timeout=30)
        except Exception:  # a dead or stuck actor reports none; Ray ends it
            return
        self.pids[name] = sorted({*self.pids.get(name, []), *pids})

    # ------------------------------------------------------------------ stages

    def start_redis(self) -> str:
        if self.plan.args.redis_url:
            return self.plan.args.redis_url
        a = self.actors_mod.RedisServer.options(**self._options("redis", "redis", num_cpus=0)).remote(
            str(self.plan.run_dir / "redis"), self.plan.host, self.plan.redis_password)
        self.actors["redis"] = a
        url = self.ray.get(a.url.remote(), timeout=self.plan.args.start_timeout)
        self._record_pids("redis")
        return url

    def start_broker(self, redis_url: str) -> str:
        cfg = merge(self.plan.broker, {"redis": {"url": redis_url}})
        a = self.actors_mod.ServiceActor.options(**self._options("broker", "broker", num_cpus=0)).remote("broker")
        self.actors["broker"] = a
        timeout = self.plan.args.start_timeout
        target = self.ray.get(a.start.remote(cfg, self.plan.host, timeout), timeout=timeout + 30)
        self._record_pids("broker")
        return target

    def place_learner(self) -> list[Any]:
        """One bundle per rank in a placement group (PACK: one node when it fits)."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        a = self.plan.args
        bundle = {"CPU": a.learner_cpus, **({"GPU": a.learner_gpus} if a.learner_gpus else {})}
        self.pg = placement_group([bundle] * a.learner_nproc, strategy="PACK", name=f"{self.prefix}-learner")
        try:
            self.ray.get(self.pg.ready(), timeout=a.start_timeout)
        except self.ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"the learner placement group ({a.learner_nproc} x {bundle}) could not be placed "
                               f"in {a.start_timeout:.0f}s; cluster resources: {self.ray.cluster_resources()}") from None
        ranks = []
        for i in range(a.learner_nproc):
            strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)
            r = self.actors_mod.LearnerRank.options(**self._options(
                f"learner-{i}", "learner", num_cpus=a.learner_cpus, num_gpus=a.learner_gpus,
                scheduling_strategy=strategy)).remote(i, a.learner_nproc)
            self.actors[f"learner-{i}"] = r
            ranks.append(r)
        return ranks

    def rank_envs(self, ranks: list[Any]) -> tuple[list[dict[str, str]], str]:
        """torch.distributed env per rank. With GPUs, each rank sees every GPU its node gives the
        group, in order, and LOCAL_RANK picks its own (as torchrun would), so nccl can use P2P."""
        where = self.ray.get([r.placement.remote() for r in ranks], timeout=self.plan.args.start_timeout)
        master = self.plan.host or where[0]["ip"]
        port = self.ray.get(ranks[0].free_port.remote(master))
        by_node: dict[str, list[int]] = {}
        for i, w in enumerate(where):
            by_node.setdefault(w["node_id"], []).append(i)
        envs = []
        for i, w in enumerate(where):
            peers = by_node[w["node_id"]]
            env = {"RANK": str(i), "WORLD_SIZE": str(len(ranks)), "MASTER_ADDR": master, "MASTER_PORT": str(port),
                   "LOCAL_WORLD_SIZE": str(len(peers)), "LOCAL_RANK": str(peers.index(i))}
            gpus = sorted({g for p in peers for g in where[p]["gpu_ids"]}, key=lambda g: (len(g), g))
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
                env["LOCAL_RANK"] = str(gpus.index(w["gpu_ids"][0]))
            envs.append(env)
        return envs, master

    def start_rollout(self, i: int, cfg: dict[str, Any]) -> Any:
        a = self.plan.args
        actor = self.actors_mod.ServiceActor.options(**self._options(
            f"rollout-{i}", "rollout", num_cpus=a.rollout_cpus, num_gpus=a.rollout_gpus)).remote("rollout")
        self.actors[f"rollout-{i}"] = actor
        return actor.start.remote({**cfg, "worker_id": f"{self.prefix}-rollout-{i}"}, self.plan.host, a.start_timeout)

    def run(self) -> int:
        """Bring everything up, train, return the number of steps the learner was asked for."""
        p = self.plan
        redis_url = self.start_redis()
        print(f"redis   {redis_url}", flush=True)
        broker = self.targets["broker"] = self.start_broker(redis_url)
        print(f"broker  {broker}", flush=True)
        write_env_file(p, broker)
        ranks = self.place_learner()
        envs, learner_host = self.rank_envs(ranks)
        learner_port = self.ray.get(ranks[0].free_port.remote(learner_host))
        learner_target = self.targets["learner"] = f"{learner_host}:{learner_port}"
        learner_cfg = merge(p.learner, {"broker": broker, "server": {"host": learner_host, "port": learner_port}})
        runs = {r.run.remote(learner_cfg, env): f"learner rank {i}" for i, (r, env) in enumerate(zip(ranks, envs, strict=True))}
        for i in range(len(ranks)):
            self._record_pids(f"learner-{i}")
        rollout_cfg = merge(p.rollout, {"broker": broker, "learner": learner_target})
        starts = {self.start_rollout(i, rollout_cfg): f"rollout-{i}" for i in range(p.args.rollouts)}
        serving = ranks[0].wait_serving.remote(learner_target, p.args.start_timeout)
        self.supervise(runs, {**starts, serving: "learner"})
        return int(p.learner["steps"])

    def supervise(self, runs: dict[Any, str], starting: dict[Any, str]) -> None:
        """Until every learner rank returns: report rollouts and the learner as they come up, and
        fail at once if a rank fails, a service ends, or a stage overruns its time."""
        ray, a = self.ray, self.plan.args
        services = {self.actors["broker"].join.remote(): "the broker"}
        runs, starting = dict(runs), dict(starting)
        start_deadline = self._stage_deadline()
        while runs:
            now = time.monotonic()
            if starting and now > start_deadline:
                raise TimeoutError(f"not serving after {a.start_timeout:.0f}s: {', '.join(starting.values())}")
            if self.deadline is not None and now > self.deadline:
                raise TimeoutError(f"--timeout {a.timeout:.0f}s reached")
            ready, _ = ray.wait([*runs, *starting, *services], num_returns=1, timeout=5.0)
            for ref in ready:
                if ref in services:
                    ray.get(ref)  # raises the service's error, if it has one
                    raise RuntimeError(f"{services[ref]} stopped while the learner was training")
                if ref in runs:
                    ray.get(ref)
                    print(f"{runs.pop(ref)} done", flush=True)
                    continue
                name, result = starting.pop(ref), ray.get(ref)
                if name == "learner":
                    if result:
                        print(f"learner {self.targets['learner']} ({a.learner_nproc} rank(s)); training "
                              f"{self.plan.learner['steps']} steps, metrics in {self.plan.run_dir}/metrics.jsonl",
                              flush=True)
                    continue
                self.targets[name] = result
                self._record_pids(name)
                services[self.actors[name].join.remote()] = name
                print(f"{name:<9} {result}", flush=True)

    def stop(self) -> None:
        """Stop rollouts, learner, broker, Redis (in that order), kill their actors, free the group."""
        ray = self.ray
        for name in self.actors:  # again: children started since (a vLLM engine mid-start)
            self._record_pids(name)
        order = sorted(self.actors, key=lambda n: ("rollout", "learner", "broker", "redis").index(n.split("-")[0]))
        for name in order:
            if name.startswith("learner"):
                continue  # finished, or failed: killing the actor ends the rank
            try:
                ray.get(self.actors[name].stop.remote(), timeout=60)
            except Exception as e:
                print(f"  {name} did not stop cleanly: {type(e).__name__}: {e}", flush=True)
        for name in order:
            ray.kill(self.actors[name], no_restart=True)
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _reap(pids: list[int], timeout_s: float) -> list[int]:
    """Wait for `pids` (this machine's) to exit; SIGKILL and return those that did not."""
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in pids if _alive(p)]
    for p in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return left


def _init_ray(plan: Plan) -> None:
    import ray

    import deploy

    a = plan.args
    modules: list[Any] = [deploy]
    if a.ship_code:
        import loraloop
        import services

        modules += [services, loraloop]
    runtime_env = {"py_modules": modules}
    if plan.local:
        # The raylet reaps what a dead actor leaves behind (vLLM's engine process); see Ray's
        # "Lifetimes of a User-Spawn Process". A cluster sets this at `ray start`.
        os.environ.setdefault("RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper", "true")
        reserved = a.rollouts * a.rollout_cpus + a.learner_nproc * a.learner_cpus
        num_cpus = a.num_cpus or max(os.cpu_count() or 1, math.ceil(reserved))
        ray.init(num_cpus=num_cpus, include_dashboard=a.dashboard, namespace="loraloop",
                 runtime_env=runtime_env, _node_ip_address="127.0.0.1")
        print(f"ray     local, {num_cpus} CPUs, {int(ray.cluster_resources().get('GPU', 0))} GPUs", flush=True)
    else:
        ray.init(address=a.address, namespace="loraloop", runtime_env=runtime_env)
        print(f"ray     {a.address}: {ray.cluster_resources()}", flush=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops everything as Ctrl-C does, once


def launch(argv: list[str]) -> dict[str, Any]:
    """Run to completion; returns (and writes to <run_dir>/ray-launch.json) what happened:
    ok, error, service addresses, and the pids seen, all gone by the time this returns."""
    args, extra = parser().parse_known_args(argv)
    plan = make_plan(args, extra)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    import ray

    t0 = time.monotonic()
    summary: dict[str, Any] = {"ok": False, "error": None, "steps": None, "local_ray": plan.local}
    _init_ray(plan)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    launch_ = Launch(plan)
    try:
        summary["steps"] = launch_.run()
        summary["ok"] = True
    except KeyboardInterrupt:
        summary["error"] = "interrupted"
    except Exception as e:
        cause = getattr(e, "cause", None) or e  # a RayTaskError carries the actor's exception
        summary["error"] = f"{type(cause).__name__}: {cause}"
    finally:
        for sig in previous:  # every step below has a time limit: let it finish
            signal.signal(sig, signal.SIG_IGN)
        print("stopping ...", flush=True)
        try:
            launch_.stop()
        except Exception as e:
            print(f"  stopping the actors: {type(e).__name__}: {e}", flush=True)
        ray_pids = [p for p in launch_.actors_mod.process_tree() if p != os.getpid()] if plan.local else []
        ray.shutdown()
        actor_pids = [p for ps in launch_.pids.values() for p in ps] if plan.local else []
        summary.update(targets=launch_.targets, pids=launch_.pids, ray_pids=ray_pids,
                       left_running=_reap(sorted(set(actor_pids + ray_pids)), 60),
                       elapsed_s=round(time.monotonic() - t0, 1))
        (plan.run_dir / "ray-launch.json").write_text(json.dumps(summary, indent=1) + "\n")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return summary


def main(argv: list[str] | None = None) -> int:
    summary = launch(sys.argv[1:] if argv is None else argv)
    if summary["ok"]:
        print(f"done: {summary['steps']} steps in {summary['elapsed_s']}s; everything stopped", flush=True)
        return 0
    print(f"ray launcher: {summary['error']}", file=sys.stderr)
    return 130 if summary["error"] == "interrupted" else 1


if __name__ == "__main__":
    sys.exit(main())
