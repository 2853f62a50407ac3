"""The validation pass (verl's `data.val_files` + `trainer.test_freq`): mean reward and
accuracy of the current adapter on a held-out prompt set, greedy and sampled, logged as
`val/*` to `<run_dir>/val_metrics.jsonl` and TensorBoard.

The learner cannot generate, so a round goes through the same leases as training: when a
round is due, LeasePrompts hands out validation leases before training ones (greedy: n=1 at
temperature 0; sampled: n=`samples` at `temperature`), the rollout servers generate and score
them with the run's reward function, and SubmitTrajectories routes their groups (ids
`val:<round>:...`) here instead of the training table. Nothing of a validation round is ever
trained on, and it does not count against the staleness bound.

Training goes on while a round runs (rounds are asynchronous, like the rest of the system):
a round is asked for at version V (`min_version` V), and its row says which versions the
samples came from (`val/version_min`, `val/version_max`); with leases handed out first they
are V or V+1. One round at a time: a round due while one is running is skipped and counted
(`val/skipped_rounds`). Groups not returned by their deadline are leased again, as in
training. Pure Python; the clock is injectable.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loraloop.v1 import rollout_pb2 as rpb
from services.common.trajectories import (
    AcceptResult,
    AckCode,
    GroupSpec,
    Lease,
    TrajectoryGroupRecord,
)

log = logging.getLogger(__name__)
PREFIX = "val:"


@dataclass(frozen=True)
class ValPrompt:
    uid: str
    token_ids: tuple[int, ...]
    text: str
    data_source: str
    ground_truth: str
    extra_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Group:
    spec: GroupSpec
    mode: str
    lease_id: str | None = None
    deadline: float = 0.0
    leases: set[str] = field(default_factory=set)
    result: TrajectoryGroupRecord | None = None


@dataclass
class _Round:
    number: int
    step: int
    version: int
    started: float
    groups: dict[str, _Group]


def is_correct(reward: float, details_json: str, threshold: float) -> bool:
    """verl's convention: a reward function may return `acc` among its details; without it, a
    sample is correct when its reward reaches `threshold`."""
    try:
        details = json.loads(details_json) if details_json else {}
    except ValueError:
        details = {}
    acc = details.get("acc") if isinstance(details, dict) else None
    if isinstance(acc, bool | int | float):
        return bool(acc)
    return reward >= threshold


class Validator:
    """Validation rounds for one learner. `modes` maps a mode name to its sampling params
    (`greedy`, `sampled`); every prompt is one group per mode."""

    def __init__(self, prompts: Sequence[ValPrompt], *, adapter_name: str, modes: dict[str, rpb.SamplingParams],
                 reward_fn: str, vocab_size: int, correct_threshold: float = 1.0,
                 lease_timeout_s: float = 60.0, max_groups_per_lease: int = 8,
                 on_done: Callable[[dict[str, Any]], None] = lambda row: None,
                 clock: Callable[[], float] = time.time) -> None:
        if not prompts:
            raise ValueError("a validation set needs at least one prompt")
        if not modes:
            raise ValueError("validation needs at least one mode (greedy or sampled)")
        self.prompts = list(prompts)
        self.adapter_name, self.modes, self.reward_fn = adapter_name, dict(modes), reward_fn
        self.vocab_size, self.threshold = vocab_size, correct_threshold
        self.lease_timeout_s, self.max_groups_per_lease = lease_timeout_s, max_groups_per_lease
        self.on_done, self.clock = on_done, clock
        self._lock = threading.Lock()
        self._round: _Round | None = None
        self._rounds = 0
        self._lease_seq = 0
        self.skipped = 0
        self.done = threading.Event()
        self.done.set()
        self.last_row: dict[str, Any] | None = None

    # -- rounds

    def start(self, step: int, version: int) -> bool:
        """Ask for a round of `version` (the adapter after `step`); False (counted) while the
        previous round is still out."""
        with self._lock:
            if self._round is not None:
                self.skipped += 1
                return False
            self._rounds += 1
            n = self._rounds
            groups = {}
            for mode in self.modes:
                for p in self.prompts:
                    gid = f"{PREFIX}{n}:{mode}:{p.uid}"
                    groups[gid] = _Group(GroupSpec(gid, p.uid, p.token_ids, p.text, p.data_source, p.ground_truth,
                                                   dict(p.extra_info)), mode)
            self._round = _Round(n, step, version, self.clock(), groups)
            self.done.clear()
            return True

    @property
    def running(self) -> bool:
        return self._round is not None

    def wait(self, timeout: float) -> bool:
        """Block until no round is out (True) or `timeout` seconds pass (False)."""
        return self.done.wait(timeout)

    # -- the service's side

    def lease(self, worker_id: str, max_groups: int = 0) -> tuple[Lease, rpb.SamplingParams] | None:
        """Groups of one mode that nobody holds (or whose lease expired), with that mode's
        sampling; None when there is nothing to hand out."""
        with self._lock:
            r = self._round
            if r is None:
                return None
            now = self.clock()
            want = min(max_groups or self.max_groups_per_lease, self.max_groups_per_lease)
            free = [g for g in r.groups.values() if g.result is None and (g.lease_id is None or g.deadline <= now)]
            if not free:
                return None
            mode = free[0].mode
            chosen = [g for g in free if g.mode == mode][:want]
            self._lease_seq += 1
            lease_id = f"{PREFIX}{r.number}-{self._lease_seq}"
            deadline = now + self.lease_timeout_s
            for g in chosen:
                g.lease_id, g.deadline = lease_id, deadline
                g.leases.add(lease_id)
            sampling = self.modes[mode]
            lease = Lease(lease_id, worker_id, self.adapter_name, r.version, deadline, sampling.n or 1,
                          tuple(g.spec for g in chosen))
            return lease, sampling

    @staticmethod
    def owns(group_id: str) -> bool:
        return group_id.startswith(PREFIX)

    def accept(self, rec: TrajectoryGroupRecord, current_version: int) -> AcceptResult:
        gid = rec.group_id
        with self._lock:
            r = self._round
            g = r.groups.get(gid) if r is not None else None
            if g is None:
                return AcceptResult(gid, AckCode.FAILED_PRECONDITION, "unknown or finished validation group")
            if g.result is not None:
                return AcceptResult(gid, AckCode.ALREADY_EXISTS, "group already accepted")
            if rec.lease_id not in g.leases:
                return AcceptResult(gid, AckCode.FAILED_PRECONDITION,
                                    f"group was never leased under lease {rec.lease_id!r}")
            from services.learner.leases import invalid_group

            problem = invalid_group(rec, g.spec, adapter_name=self.adapter_name, n=self.modes[g.mode].n or 1,
                                    vocab_size=self.vocab_size, versions=(r.version, current_version))
            if problem:
                if g.lease_id == rec.lease_id:
                    g.lease_id = None
                return AcceptResult(gid, AckCode.INVALID_ARGUMENT, problem)
            g.result = rec
            finished = all(x.result is not None for x in r.groups.values())
            if finished:
                self._round = None
        if finished:
            row = self.summarize(r)
            self.last_row = row
            try:
                self.on_done(row)
            except Exception:  # e.g. the metrics file's disk is full: the round is still over
                log.exception("validation round %d: writing its row failed", r.number)
            finally:
                self.done.set()
        return AcceptResult(gid, AckCode.OK)

    # -- metrics

    def summarize(self, r: _Round) -> dict[str, Any]:
        """The round's row: per mode, mean reward and accuracy over samples (and per data source
        when there are several); for sampled modes also pass@n (share of prompts with at least
        one correct sample)."""
        row: dict[str, Any] = {"step": r.step, "val/version": r.version, "val/round": r.number,
                               "val/prompts": len(self.prompts), "val/skipped_rounds": self.skipped,
                               "val/seconds": round(self.clock() - r.started, 3)}
        versions = [s.adapter_version for g in r.groups.values() for s in g.result.samples]  # type: ignore[union-attr]
        row["val/version_min"], row["val/version_max"] = min(versions), max(versions)
        sources = {p.data_source for p in self.prompts}
        for mode, params in self.modes.items():
            by_source: dict[str, list[tuple[float, bool]]] = defaultdict(list)
            any_correct = []
            for g in r.groups.values():
                if g.mode != mode:
                    continue
                assert g.result is not None
                scored = [(s.reward, is_correct(s.reward, s.reward_details_json, self.threshold))
                          for s in g.result.samples]
                by_source[g.spec.data_source].extend(scored)
                any_correct.append(any(c for _, c in scored))
            everything = [x for xs in by_source.values() for x in xs]
            row.update(_stats(f"val/{mode}", everything))
            if (params.n or 1) > 1:
                row[f"val/{mode}/pass@{params.n}"] = sum(any_correct) / len(any_correct)
            if len(sources) > 1:
                for src, xs in sorted(by_source.items()):
                    row.update(_stats(f"val/{mode}/{src or 'unknown'}", xs))
        return row


def _stats(prefix: str, scored: list[tuple[float, bool]]) -> dict[str, float]:
    rewards = [r for r, _ in scored]
    out = {f"{prefix}/reward/mean": statistics.fmean(rewards),
           f"{prefix}/accuracy": sum(c for _, c in scored) / len(scored)}
    assert all(math.isfinite(v) for v in out.values())
    return out
