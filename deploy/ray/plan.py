"""What the Ray launcher decides before Ray starts: its command line, the three services'
validated configs (defaults < TOML < `--learner.KEY=VALUE` ...), role tokens, each actor's
environment. Imports pydantic and the config modules only, so `--help` answers at once."""

from __future__ import annotations

import argparse
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("learner", "rollout", "client")
SECTIONS = ("learner", "rollout", "broker")
OVERRIDES_HELP = """\
service settings:
  --learner.KEY=VALUE, --rollout.KEY=VALUE, --broker.KEY=VALUE go to that service's config,
  exactly as `loraloop learner|rollout|broker --KEY=VALUE` (see their --help), e.g.
  --learner.data.groups_per_step=4 --learner.algo.lr=5e-4 --rollout.engine.max_num_seqs=32.
  Addresses and ports are set by the launcher.

examples:
  python -m deploy.ray.launcher --model runs/tiny-model --steps 20          # laptop, CPU
  python -m deploy.ray.launcher --address auto --model /shared/qwen2.5-0.5b \\
      --run-dir /shared/runs/exp1 --rollouts 4 --rollout-gpus 1 \\
      --learner-nproc 4 --learner-gpus 1 --redis-url redis://redis-host:6379/0
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deploy.ray.launcher", allow_abbrev=False, epilog=OVERRIDES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run loraloop on Ray: a broker, rollout replicas (vLLM) and the learner ranks (one "
        "placement group) as actors, until the learner has trained --steps steps; then stop everything.")
    p.add_argument("--model", required=True,
                   help="base model directory (HF layout, safetensors), at the same path on every node")
    p.add_argument("--run-dir", default="runs/ray",
                   help="checkpoints, metrics.jsonl, Redis data, stack.env (shared storage on a cluster; "
                   "default runs/ray)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the learner config's)")
    p.add_argument("--learner-config", help="learner TOML (as for `loraloop learner`)")
    p.add_argument("--rollout-config", help="rollout TOML (as for `loraloop rollout`)")
    p.add_argument("--broker-config", help="broker TOML (as for `loraloop broker`)")
    p.add_argument("--verl-file", help="a verl command line (as for `loraloop up --verl-file`): its learner and "
                                       "rollout settings, under the --learner./--rollout. flags")
    g = p.add_argument_group("placement")
    g.add_argument("--rollouts", type=int, default=1, help="rollout replicas (default 1)")
    g.add_argument("--rollout-gpus", type=float, default=0.0, help="GPUs per rollout replica (0 on CPU; default 0)")
    g.add_argument("--rollout-cpus", type=float, default=1.0, help="CPUs Ray reserves per rollout (default 1)")
    g.add_argument("--learner-nproc", type=int, default=1, help="learner ranks: one actor per bundle (default 1)")
    g.add_argument("--learner-gpus", type=int, choices=(0, 1), default=0,
                   help="GPUs per learner rank (0: gloo on CPU, 1: nccl; default 0)")
    g.add_argument("--learner-cpus", type=float, default=1.0, help="CPUs per learner rank (default 1)")
    c = p.add_argument_group("cluster")
    c.add_argument("--address", default=None,
                   help="existing Ray cluster (auto, HOST:6379 or ray://HOST:10001); default: start a local "
                   "Ray on 127.0.0.1 and stop it at the end")
    c.add_argument("--num-cpus", type=int, default=None,
                   help="local Ray: logical CPUs (default: what the actors reserve, at least the core count)")
    c.add_argument("--dashboard", action="store_true", help="local Ray: start the dashboard too")
    c.add_argument("--redis-url", default=None,
                   help="use this Redis (AOF, appendfsync always; password from $LORALOOP_REDIS_PASSWORD) "
                   "instead of starting redis-server under the run dir")
    c.add_argument("--ship-code", action="store_true",
                   help="also ship services/ and loraloop/ to the workers (nodes that have the dependencies "
                   "but not loraloop installed); deploy/ is always shipped")
    c.add_argument("--start-timeout", type=float, default=600.0,
                   help="seconds for each stage to come up (placement, vLLM start; default 600)")
    c.add_argument("--timeout", type=float, default=None, help="stop everything after this many seconds")
    return p


def split_overrides(extra: list[str]) -> dict[str, list[str]]:
    """`["--learner.steps=3", "--rollout.port", "9"]` -> {"learner": ["--steps=3"], "rollout": ["--port", "9"], ...}."""
    out: dict[str, list[str]] = {s: [] for s in SECTIONS}
    current: list[str] | None = None
    for arg in extra:
        if arg.startswith("--"):
            section, dot, rest = arg[2:].partition(".")
            if not dot or section not in out or not rest:
                raise SystemExit(f"unknown argument {arg!r}: service settings look like "
                                 f"--{{{','.join(SECTIONS)}}}.KEY=VALUE (see --help)")
            current = out[section]
            current.append(f"--{rest}")
        elif current and "=" not in current[-1]:
            current.append(arg)
        else:
            raise SystemExit(f"unexpected argument {arg!r}")
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class Plan:
    """Everything decided before Ray starts: validated configs, tokens, placement."""

    args: argparse.Namespace
    run_dir: Path
    learner: dict[str, Any]
    rollout: dict[str, Any]
    broker: dict[str, Any]
    tokens: dict[str, str]
    redis_password: str | None
    env: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def local(self) -> bool:
        return self.args.address is None

    @property
    def host(self) -> str | None:
        """Where services listen: loopback on a local Ray, each node's own address on a cluster."""
        return "127.0.0.1" if self.local else None


def _tokens() -> dict[str, str]:
    """Role tokens from $LORALOOP_TOKENS when it names every role, else fresh ones."""
    by_role: dict[str, str] = {}
    for pair in os.environ.get("LORALOOP_TOKENS", "").split(","):
        role, _, token = pair.strip().partition(":")
        by_role[role] = token
    if all(by_role.get(r) for r in ROLES):
        return {r: by_role[r] for r in ROLES}
    return {r: secrets.token_urlsafe(24) for r in ROLES}


def make_plan(args: argparse.Namespace, extra: list[str]) -> Plan:
    from services.broker.config import ALIASES as BROKER_ALIASES
    from services.broker.config import BrokerConfig
    from services.common.config import load_config, parse_overrides
    from services.learner.config import ALIASES as LEARNER_ALIASES
    from services.learner.config import LearnerConfig
    from services.rollout.config import ALIASES as ROLLOUT_ALIASES
    from services.rollout.config import RolloutConfig

    for name, value, low in (("--rollouts", args.rollouts, 1), ("--learner-nproc", args.learner_nproc, 1)):
        if value < low:
            raise SystemExit(f"{name} must be >= {low}")
    if args.learner_cpus <= 0 or args.rollout_cpus < 0 or args.rollout_gpus < 0:
        raise SystemExit("--learner-cpus must be > 0; --rollout-cpus and --rollout-gpus >= 0")
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    run_dir = Path(args.run_dir).resolve() if args.address is None else Path(args.run_dir)
    over = split_overrides(extra)

    def config(cls, path, base, section, aliases) -> dict[str, Any]:
        try:
            cfg = load_config(cls, path, merge(base, parse_overrides(over[section], aliases)))
        except SystemExit as e:
            raise SystemExit(f"{section} settings (--{section}.KEY=VALUE): {e}") from None
        return cfg.model_dump(mode="json")

    verl: dict[str, Any] = {}
    if args.verl_file:
        from services.verl import VerlError, read_file, split_command, translate

        try:
            tr = translate(split_command(read_file(args.verl_file)))
        except VerlError as e:
            raise SystemExit(f"--verl-file {args.verl_file}: {e}") from None
        verl = tr.overrides
        for note in dict.fromkeys(tr.notes):
            print(f"verl: {note}", flush=True)
        for key in sorted(set(verl) - {"learner", "rollout"}):
            print(f"verl: {key} is a `loraloop up` setting; the Ray launcher does not apply it", flush=True)
        if "nproc" in verl.get("learner", {}):
            print(f"verl: learner ranks are --learner-nproc here ({args.learner_nproc}); the command asked for "
                  f"{verl['learner']['nproc']}", flush=True)
    learner_base: dict[str, Any] = merge(verl.get("learner", {}), {"model": {"path": model}, "run_dir": str(run_dir)})
    if args.steps is not None:
        learner_base["steps"] = args.steps
    learner = config(LearnerConfig, args.learner_config, learner_base, "learner", LEARNER_ALIASES)
    learner["nproc"] = args.learner_nproc
    rollout = config(RolloutConfig, args.rollout_config, merge(verl.get("rollout", {}), {"engine": {"model": model}}),
                     "rollout", ROLLOUT_ALIASES)
    broker = config(BrokerConfig, args.broker_config, {}, "broker", BROKER_ALIASES)
    if args.redis_url:
        broker["redis"]["url"] = args.redis_url
    tokens = _tokens()
    all_tokens = ",".join(f"{r}:{t}" for r, t in tokens.items())
    password = (os.environ.get(broker["redis"]["password_env"]) if args.redis_url
                else secrets.token_hex(16))
    plan = Plan(args, run_dir, learner, rollout, broker, tokens, password)
    plan.env = {
        "broker": {broker["auth"]["tokens_env"]: all_tokens,
                   **({broker["redis"]["password_env"]: password} if password else {})},
        "learner": {learner["auth"]["tokens_env"]: all_tokens, learner["token_env"]: tokens["learner"]},
        "rollout": {rollout["auth"]["tokens_env"]: all_tokens, rollout["token_env"]: tokens["rollout"],
                    **(_cpu_engine_env(rollout["engine"]) if args.rollout_gpus == 0 else {}),
                    **({"VLLM_HOST_IP": "127.0.0.1"} if args.address is None else {})},
        "redis": {},
    }
    return plan


def _cpu_engine_env(engine: dict[str, Any]) -> dict[str, str]:
    """vLLM CPU settings, made explicit: it reads the KV-cache size as whole GiB."""
    return {"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(engine["kv_cache_gib"]))),
            "VLLM_CPU_OMP_THREADS_BIND": engine["cpu_threads_bind"]}


def write_env_file(plan: Plan, broker: str) -> None:
    """<run_dir>/stack.env (0600): `source` it to use `loraloop adapters` against this run."""
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    path = plan.run_dir / "stack.env"
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(f"LORALOOP_BROKER={broker}\n"
                    f"LORALOOP_TOKENS={','.join(f'{r}:{t}' for r, t in plan.tokens.items())}\n"
                    f"LORALOOP_TOKEN={plan.tokens['learner']}\n")
