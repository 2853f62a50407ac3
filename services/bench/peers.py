"""`loraloop bench peers`: loraloop against TRL on the same job, in one invocation.

Both sides get the same warm-started tiny model (built here exactly as `loraloop up` builds
it), the same prompts (token-identical), reward, batch (32 prompts x 8 samples), response
length, sampling temperature, LoRA (r16/alpha 32, all-linear), optimizer (AdamW, constant lr
1e-3), loss (token mean, no KL) and step count, and the same machine: they run one after
the other, never together, ours first. Ours is `loraloop up` as a user runs it (Redis, broker,
learner and one rollout replica, as processes); the peer is TRL's `GRPOTrainer` + peft in a
virtual environment of its own (services/bench/peer_env.py: TRL's pins never touch ours),
running services/bench/trl_peer.py with all the machine's cores as torch threads.

Figures per side: seconds per step (median of the wall time between consecutive steps),
time to the reward target (the first step at which the 20-step moving mean of the batch
reward has risen `--target-gain` above the mean of the first 20 steps; seconds from the
first step), final reward (mean of the last 5 steps), time from the command to the first step,
and the peak resident memory of the side's whole process tree (sum over its processes,
sampled every 0.5 s). The table shows ours/TRL for each, with the issue's goal.

Then the rollout side's floor (services/bench/gen_floor.py): vLLM alone, offline and in one
process, generating one batch of the workload on the cores the stack gives its engine. One
replica generates every batch, so our step cannot beat it; printed beside TRL's whole step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.bench import children as _children  # noqa: F401  (tests list a tree with it)
from services.bench import emit, read_lines, tree_pids

SAMPLES = 8  # samples per group, both workloads


@dataclass(frozen=True)
class Workload:
    """One job, as each side is told it. `micro` is both sides' micro-batch (rows per
    forward/backward)."""

    shape: str
    groups: int
    max_tokens: int
    ignore_eos: bool
    reward: str  # ours (services/rollout/rewards.py)
    peer_reward: str  # trl_peer.py --reward
    micro: int
    goals: dict[str, str]

    def ours_args(self) -> list[str]:
        if self.shape == "tiny":
            return []  # the demo as `loraloop up` runs it
        return [f"--learner.data.groups_per_step={self.groups}", f"--learner.data.max_tokens={self.max_tokens}",
                f"--learner.data.ignore_eos={str(self.ignore_eos).lower()}", f"--learner.data.reward_fn={self.reward}",
                f"--learner.algo.micro_batch_size={self.micro}",
                # a lease of 8 groups x 8 x 128 tokens takes the engine tens of seconds here
                "--learner.data.lease_deadline_s=600"]

    def peer_args(self) -> list[str]:
        return ["--prompts-per-step", str(self.groups), "--max-new-tokens", str(self.max_tokens),
                "--min-new-tokens", str(self.max_tokens if self.ignore_eos else 0), "--reward", self.peer_reward,
                "--micro-batch", str(self.micro)]


WORKLOADS = {
    # The default demo: 32 prompts x 8 samples x 3 tokens on the 0.3 M model.
    "tiny": Workload("tiny", 32, 3, False, "arithmetic", "exact", 256,
                     {"s_per_step": "<= 1.0x", "time_to_target_s": "<= 1.0x"}),
    # Generation-heavy: the 25m shape, 16 prompts x 8 samples x 128 tokens, every response full
    # length (ours: vLLM's ignore_eos; TRL: min_new_tokens), reward on the answer's position.
    "heavy": Workload("25m", 16, 128, True, "arithmetic_prefix", "prefix", 32,
                      {"s_per_step": "<= 0.5x", "time_to_target_s": "<= 0.5x"}),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="loraloop bench peers",
        description="loraloop (`loraloop up`, the local stack) against TRL 1.16 GRPOTrainer + peft (its own venv) "
                    "on the tiny arithmetic demo: s/step, time to a reward target, final reward, peak memory, "
                    "one side after the other in this invocation.")
    p.add_argument("--out", type=Path, help="write every figure to this JSON file")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny",
                   help="tiny: the default demo (0.3 M model, 32x8 samples, 3 tokens); heavy: the 25m shape, "
                        "16x8 samples of 128 tokens each (generation-heavy)")
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench-peers"),
                   help="model, run dirs and the peer's output go here")
    p.add_argument("--steps", type=int, default=700, help="training steps on each side (the demo's 700)")
    p.add_argument("--target-gain", type=float, default=0.3,
                   help="reward target: 20-step moving mean this far above the first 20 steps' mean")
    p.add_argument("--peer-threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch threads of the peer (default: every core this process may use, as ours uses them)")
    p.add_argument("--venv", type=Path, default=None,
                   help="the peer's venv (default ~/.cache/loraloop/peer-trl or $LORALOOP_PEER_VENV)")
    p.add_argument("--venv-timeout", type=float, default=1800.0,
                   help="seconds allowed to build the peer's venv; past it the peer is skipped, saying so")
    p.add_argument("--skip-peer", action="store_true", help="run ours only")
    p.add_argument("--staleness", default="",
                   help="also run ours at these max_staleness values, e.g. 0,1,2 (1 is the demo run): async vs sync")
    p.add_argument("--staleness-steps", type=int, default=0, help="steps of those extra runs (default --steps)")
    p.add_argument("--plot", type=Path, help="write reward against wall-clock time, both sides, to this PNG")
    p.add_argument("--skip-floor", action="store_true",
                   help="skip the rollout floor (vLLM's own offline generation of one batch on the engine's cores)")
    p.add_argument("--floor-rounds", type=int, default=30, help="timed batches of the rollout floor")
    p.add_argument("--quick", action="store_true", help="a smoke run: 12 steps per side, venv build <= 300 s")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.venv_timeout, a.floor_rounds = 12, min(a.venv_timeout, 300.0), min(a.floor_rounds, 5)
    if a.steps < 2:
        p.error("--steps must be >= 2")
    try:
        a.staleness = sorted({int(x) for x in a.staleness.split(",") if x.strip()})
    except ValueError:
        p.error(f"--staleness: comma-separated integers expected, got {a.staleness!r}")
    if a.staleness and 1 not in a.staleness:
        a.staleness = sorted({1, *a.staleness})  # the demo run is the reference
    return a


# ------------------------------------------------------------------ process-tree memory


def _rss_kb(pid: int) -> int:
    for line in read_lines(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def tree_rss_kb(pid: int) -> int:
    """Resident memory of `pid` and every descendant, summed (0 where /proc is not Linux's)."""
    return sum(_rss_kb(p) for p in tree_pids(pid))


class PeakTreeMemory:
    """Samples `tree_rss_kb(pid)` every `every_s` on a thread; `.peak_mb` is the largest sum."""

    def __init__(self, pid: int, every_s: float = 0.5) -> None:
        self.pid, self.every_s, self.peak_kb = pid, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-tree-memory")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, tree_rss_kb(self.pid))
            self._stop.wait(self.every_s)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kb / 1024


# ------------------------------------------------------------------ figures


def figures(rows: list[dict[str, Any]], reward_key: str, time_key: str) -> dict[str, Any]:
    """s/step (median gap between consecutive steps), training time and the rewards at both
    ends, from per-step rows (`time_key`: seconds, any origin)."""
    rows = sorted(rows, key=lambda r: r["step"])
    rewards = [float(r[reward_key]) for r in rows]
    times = [float(r[time_key]) for r in rows]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return {"steps": len(rows), "s_per_step": statistics.median(gaps) if gaps else None,
            "train_s": times[-1] - times[0] if times else None,
            "reward_first20": statistics.fmean(rewards[:20]) if rewards else None,
            "reward_last5": statistics.fmean(rewards[-5:]) if rewards else None}


def time_to_target(rows: list[dict[str, Any]], reward_key: str, target: float) -> tuple[int, float] | None:
    """(step, seconds since the first step) at which the 20-step moving mean of the reward
    first reaches `target`; None if it never does."""
    rows = sorted(rows, key=lambda r: r["step"])
    rewards = [float(r[reward_key]) for r in rows]
    for k in range(19, len(rewards)):
        if statistics.fmean(rewards[k - 19:k + 1]) >= target:
            return rows[k]["step"], float(rows[k]["time"]) - float(rows[0]["time"])
    return None


def ratio(ours: Any, peer: Any) -> float | None:
    return ours / peer if isinstance(ours, (int, float)) and isinstance(peer, (int, float)) and peer else None


# ------------------------------------------------------------------ the two sides


def build_model(work: Path, shape: str = "tiny") -> Path:
    """The demo's model, built and warm-started as `loraloop up` does (once per work dir);
    another shape the same way under model-<shape>/."""
    from services.stack import prepare_model
    from services.stack_config import StackConfig

    if shape == "tiny":
        return prepare_model(StackConfig(run_dir=str(work)), work)
    from services.common.tiny_model import make_tiny_model
    from services.common.warm_start import warm_start

    model = work / f"model-{shape}"
    if not (model / "warm_start.json").is_file():
        print(f"building and warm-starting the {shape} model in {model} ...", flush=True)
        make_tiny_model(model, seed=0, shape=shape)
        summary = warm_start(model, target=0.15, seed=0)
        print(f"  {summary['steps']} steps, sampled exact match {summary['sampled_exact_match']:.2f}", flush=True)
        (model / "warm_start.json").write_text(json.dumps(summary))
    return model


def run_ours(work: Path, model: Path, steps: int, staleness: int | None = None,
             workload: Workload = WORKLOADS["tiny"]) -> dict[str, Any]:
    """`loraloop up` on the workload (with `staleness`: its max_staleness instead of the demo's 1)."""
    name = ("loraloop" if workload.shape == "tiny" else f"loraloop-{workload.shape}") + \
        ("" if staleness is None else f"-staleness{staleness}")
    run_dir = work / name
    if (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()
    cmd = [sys.executable, "-m", "services.cli", "up", f"--run_dir={run_dir}", f"--model={model}",
           f"--learner.steps={steps}", "--plot=False", "--learner.checkpoint.resume=never"]
    cmd += workload.ours_args()
    if staleness is not None:
        cmd.append(f"--learner.algo.max_staleness={staleness}")
    print(f"ours: {' '.join(cmd[2:])}", flush=True)
    t0 = time.monotonic()
    log = (work / f"{name}-up.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    mem = PeakTreeMemory(proc.pid)
    rc = proc.wait()
    peak = mem.stop()
    wall = time.monotonic() - t0
    log.close()
    text = (work / f"{name}-up.log").read_text(errors="replace")
    if rc != 0:
        raise RuntimeError(f"loraloop up exited {rc}:\n{text[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    first = next((line for line in text.splitlines() if "first step" in line), "")
    out = figures(rows, "reward/mean", "time")
    out.update(peak_tree_rss_mb=peak, wall_s=wall, first_step_line=first.split("\r")[-1].strip(),
               update_s_median=statistics.median(r["timing_s/update"] for r in rows),
               wait_rollout_s_median=statistics.median(r["timing_s/wait_rollout"] for r in rows),
               learner_busy_s_median=statistics.median(r["timing_s/step"] - r["timing_s/wait_rollout"] for r in rows),
               # groups consumed between the first and the last step's rows, 8 samples each
               trajectories_per_s=(rows[-1]["leases/consumed"] - rows[0]["leases/consumed"]) * SAMPLES
               / max(out["train_s"], 1e-9))
    return {"rows": rows, **out}


def run_floor(work: Path, model: Path, workload: Workload, rounds: int) -> dict[str, Any]:
    """The rollout side's floor (services/bench/gen_floor.py): vLLM alone, in one process, on the
    cores the stack gives its engine, generating one batch of the workload."""
    from services.stack_config import StackConfig

    cmd = [sys.executable, "-m", "services.bench.gen_floor", f"--model={model}", f"--groups={workload.groups}",
           f"--samples={SAMPLES}", f"--max-tokens={workload.max_tokens}", f"--rounds={rounds}",
           f"--warmup={min(5, rounds)}", f"--cpu-bind={StackConfig().rollout_cpu_bind}",
           f"--adapter-dir={work / f'gen-floor-adapter-{workload.shape}'}",
           *(["--ignore-eos"] if workload.ignore_eos else [])]
    print(f"rollout floor: {' '.join(cmd[2:])}", flush=True)
    with (work / f"gen-floor-{workload.shape}.log").open("w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")), None)
    if proc.returncode != 0 or line is None:
        return {"skipped": f"gen_floor exited {proc.returncode}; see {work / f'gen-floor-{workload.shape}.log'}"}
    return json.loads(line)


def run_peer(work: Path, model: Path, steps: int, threads: int, venv: Path | None,
             venv_timeout: float, workload: Workload = WORKLOADS["tiny"]) -> dict[str, Any]:
    from services.bench import peer_env

    try:
        python = peer_env.ensure_trl_venv(venv or peer_env.DEFAULT_VENV, venv_timeout)
    except RuntimeError as e:
        return {"skipped": f"the TRL venv could not be built: {str(e).splitlines()[0]}"}
    prompts = peer_env.write_prompts_jsonl(work / "trl-prompts.jsonl", model)
    print(f"peer: TRL GRPOTrainer, {threads} thread(s) ({', '.join(f'{k} {v}' for k, v in peer_env.peer_versions(venv or peer_env.DEFAULT_VENV).items())})",
          flush=True)
    t0 = time.monotonic()
    holder: dict[str, PeakTreeMemory] = {}
    rows = peer_env.run_trl(python, model, prompts, work / f"trl-{workload.shape}.jsonl", steps, threads,
                            extra_args=workload.peer_args(), on_start=lambda pid: holder.setdefault("mem", PeakTreeMemory(pid)))
    peak = holder["mem"].stop() if "mem" in holder else None
    steps_rows = [r for r in rows if not r.get("summary")]
    summary = rows[-1]
    out = figures(steps_rows, "reward_mean", "time")
    out.update(peak_tree_rss_mb=peak, wall_s=time.monotonic() - t0, setup_s=summary.get("setup_s"),
               versions=peer_env.peer_versions(venv or peer_env.DEFAULT_VENV))
    return {"rows": steps_rows, **out}


def compare(ours: dict[str, Any], peer: dict[str, Any], target_gain: float) -> dict[str, Any]:
    """Both sides' figures against one reward target: the higher of the two sides' first-20
    means plus `target_gain` (so neither reaches it by starting higher)."""
    starts = [d["reward_first20"] for d in (ours, peer) if d.get("reward_first20") is not None]
    target = max(starts) + target_gain
    table = {}
    for side, d, key in (("loraloop", ours, "reward/mean"), ("trl", peer, "reward_mean")):
        if "rows" not in d:
            continue
        hit = time_to_target(d["rows"], key, target)
        table[side] = {k: d.get(k) for k in ("s_per_step", "reward_first20", "reward_last5", "train_s",
                                             "peak_tree_rss_mb")}
        table[side].update(target_step=hit[0] if hit else None, time_to_target_s=hit[1] if hit else None)
    return {"target": target, "table": table}


def report(res: dict[str, Any]) -> str:
    t = res["comparison"]["table"]
    ours, peer = t.get("loraloop", {}), t.get("trl", {})
    goals = res.get("goals", WORKLOADS["tiny"].goals)
    lines = [f"loraloop vs TRL, {res.get('workload_text', 'tiny arithmetic demo')}, {res['steps']} steps per side; reward target "
             f"{res['comparison']['target']:.3f} (20-step moving mean)",
             f"{'':24s}{'loraloop':>12s}{'TRL':>12s}{'ours/TRL':>10s}  goal"]

    def fmt(v: Any, spec: str) -> str:
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    for key, label, spec in (("s_per_step", "s/step (median)", ".3f"), ("time_to_target_s", "time to target (s)", ".1f"),
                             ("target_step", "step at target", "d"), ("reward_first20", "reward, first 20", ".3f"),
                             ("reward_last5", "reward, last 5", ".3f"), ("train_s", "first to last step (s)", ".1f"),
                             ("peak_tree_rss_mb", "peak memory, tree (MB)", ".0f")):
        r = ratio(ours.get(key), peer.get(key))
        lines.append(f"{label:24s}{fmt(ours.get(key), spec):>12s}{fmt(peer.get(key), spec):>12s}"
                     f"{fmt(r, '.2f'):>10s}  {goals.get(key, '')}")
    o = res["loraloop"]
    lines.append(f"ours: {o.get('first_step_line', '')}; learner update median {o['update_s_median']:.3f} s")
    fl = res.get("floor") or {}
    if "median_s" in fl:
        s_ours, s_trl = ours.get("s_per_step"), peer.get("s_per_step")
        lines.append(f"rollout floor (vLLM alone, offline, in one process on core(s) {fl['cpu_bind']}): "
                     f"{fl['median_s']:.3f} s per batch (p10 {fl['p10_s']:.3f}, p90 {fl['p90_s']:.3f}); "
                     f"ours s/step / floor {fmt(ratio(s_ours, fl['median_s']), '.2f')}, "
                     f"floor / TRL s/step {fmt(ratio(fl['median_s'], s_trl), '.2f')}"
                     + (" (vLLM alone on the engine's cores is slower than TRL's whole step)"
                        if isinstance(s_trl, float) and fl["median_s"] > s_trl else ""))
    elif "skipped" in fl:
        lines.append(f"rollout floor: skipped -- {fl['skipped']}")
    if "skipped" in res["trl"]:
        lines.append(f"TRL: skipped -- {res['trl']['skipped']}")
    else:
        lines.append(f"TRL: setup {fmt(res['trl'].get('setup_s'), '.1f')} s before its first step; "
                     + ", ".join(f"{k} {v}" for k, v in res["trl"].get("versions", {}).items()))
    return "\n".join(lines)


def staleness_study(work: Path, model: Path, steps: int, etas: list[int], demo: dict[str, Any],
                    workload: Workload = WORKLOADS["tiny"]) -> dict[str, Any]:
    """The demo at each max_staleness in `etas` (1 is the demo run itself). Generation alone
    and training alone come from the synchronous run (eta 0), where the learner waits out each
    whole batch: generation = its median wait (hot-load included), training = the rest of its
    step. Overlap efficiency = s/step / max(generation alone, training alone): 1.0 is perfect
    overlap. Reward is compared at equal wall time: the 20-step moving mean when the shortest
    run ended."""
    runs = {eta: demo if eta == 1 else run_ours(work, model, steps, staleness=eta, workload=workload) for eta in etas}
    out: dict[str, Any] = {"runs": {}}
    sync = runs.get(0)
    gen = sync["wait_rollout_s_median"] if sync else None
    train = sync["learner_busy_s_median"] if sync else None
    t_equal = min(r["train_s"] for r in runs.values())
    for eta, r in runs.items():
        rows = sorted(r["rows"], key=lambda x: x["step"])
        upto = [x for x in rows if x["time"] - rows[0]["time"] <= t_equal][-20:]
        out["runs"][eta] = {"s_per_step": r["s_per_step"], "trajectories_per_s": r["trajectories_per_s"],
                            "reward_at_equal_time": statistics.fmean(x["reward/mean"] for x in upto),
                            "reward_last5": r["reward_last5"],
                            "overlap_efficiency": r["s_per_step"] / max(gen, train) if gen and train else None}
    out.update(generation_alone_s=gen, training_alone_s=train, equal_time_s=t_equal)
    return out


def staleness_report(st: dict[str, Any]) -> str:
    lines = [f"async vs sync (max_staleness): generation alone {st['generation_alone_s'] or 0:.3f} s, training alone "
             f"{st['training_alone_s'] or 0:.3f} s per batch (from the synchronous run); reward at "
             f"{st['equal_time_s']:.0f} s of training",
             f"{'max_staleness':>14s}{'s/step':>9s}{'traj/s':>9s}{'reward@t':>10s}{'last 5':>8s}{'overlap eff.':>14s}"]
    for eta, r in sorted(st["runs"].items()):
        eff = r["overlap_efficiency"]
        lines.append(f"{eta:>14d}{r['s_per_step']:>9.3f}{r['trajectories_per_s']:>9.0f}{r['reward_at_equal_time']:>10.3f}"
                     f"{r['reward_last5']:>8.3f}{(f'{eff:.2f}' if eff else '-'):>14s}")
    lines.append("overlap efficiency goal: <= 1.1 at max_staleness 1")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> Path:
    """Reward (20-step moving mean) against seconds of training, both sides on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for side, label in (("loraloop", "loraloop (loraloop up)"), ("trl", "TRL GRPOTrainer")):
        pts = res["curves"].get(side) or []
        if len(pts) < 20:
            continue
        xs = [p[0] for p in pts][19:]
        ys = [statistics.fmean(p[1] for p in pts[k - 19:k + 1]) for k in range(19, len(pts))]
        ax.plot(xs, ys, label=label)
    ax.axhline(res["comparison"]["target"], color="grey", linestyle=":", label="target")
    ax.set_xlabel("seconds since the first step")
    ax.set_ylabel("batch reward, 20-step moving mean")
    ax.set_title(f"{res.get('workload_text', 'tiny arithmetic demo')}, {res['cores']} cores", fontsize=9)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    work = a.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"building the demo model in {work} (once) ...", flush=True)
    w = WORKLOADS[a.workload]
    model = build_model(work, w.shape)
    ours = run_ours(work, model, a.steps, workload=w)
    peer = {"skipped": "--skip-peer"} if a.skip_peer else run_peer(work, model, a.steps, a.peer_threads, a.venv,
                                                                    a.venv_timeout, w)
    res = {"steps": a.steps, "cores": len(os.sched_getaffinity(0)), "peer_threads": a.peer_threads,
           "workload": a.workload, "workload_spec": w.__dict__, "goals": w.goals,
           "workload_text": (f"{w.shape} model, {w.groups} prompts x {SAMPLES} samples x {w.max_tokens} tokens"
                             + (" (full length)" if w.ignore_eos else "")),
           "loraloop": {k: v for k, v in ours.items() if k != "rows"},
           "trl": {k: v for k, v in peer.items() if k != "rows"},
           "comparison": compare(ours, peer, a.target_gain),
           "floor": {"skipped": "--skip-floor"} if a.skip_floor else run_floor(work, model, w, a.floor_rounds)}
    res["curves"] = {"loraloop": [[r["time"] - ours["rows"][0]["time"], r["reward/mean"]] for r in ours["rows"]],
                     "trl": [[r["time"] - peer["rows"][0]["time"], r["reward_mean"]] for r in peer.get("rows", [])]}
    text = report(res)
    if a.staleness:
        res["staleness"] = staleness_study(work, model, a.staleness_steps or a.steps, a.staleness, ours, w)
        text += "\n\n" + staleness_report(res["staleness"])
    if a.plot:
        text += f"\n\nplot: {plot(res, a.plot)}"
    emit(text, res, a.out)
    return 0
