"""LeaseTable: which prompt groups are out, which came back, and which the trainer may take.

Contracts (shared/design.md): leases are at-least-once (a group not returned before its
deadline is leased again), a group id is accepted exactly once, every returned field is
validated, and staleness is bounded: `version - behaviour_version <= max_staleness` for
every sample the trainer gets.

The staleness rule. Write V for the learner's current adapter version, B for
`groups_per_batch`, η for `max_staleness`, and assume (as the learner does) one batch of B
groups taken per version. A group "holds a slot" from its first lease until it is consumed
or dropped. Every lease carries `min_version = V`, so its samples have behaviour >= V.
  1. No lease at all once `batches_taken_at(V) > η`: the trainer's next batch is trained at
     V+1 or later, so anything generated now could be too stale.
  2. A group never leased before is leased only while the groups holding slots number less
     than `(η + 1 - batches_taken_at(V)) * B`: at most η+1 batches are in flight or buffered,
     so if groups come back in about the order they left, each is trained within η versions
     of the one it was leased at (AReaL's bound, arXiv:2505.24298 §5.1).
  3. Hard checks, because arrival order is not guaranteed: `accept` refuses a group with
     any sample older than the lease's `min_version` or with `V - version > η`
     (FAILED_PRECONDITION, counted, the group is leased again), and when V advances,
     buffered groups that became too stale are dropped, counted, and their prompt queued
     again as a new group id.
η = 0 is the synchronous algorithm: B groups leased at V, nothing more until they are taken
and V+1 is set.

Pure Python, no gRPC; the clock is injectable (`now` arguments, or `clock=`). The records it
hands out and takes back (services.common.trajectories) convert to and from the
learner.proto messages at the service edge. The table keeps its own lock: the gRPC service's
thread and the training loop call it alike.
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from services.common.trajectories import (
    AcceptResult,
    AckCode,
    GroupSpec,
    Lease,
    Refusal,
    RefusalReason,
    TrajectoryGroupRecord,
    finite32,
)

F = TypeVar("F", bound=Callable[..., Any])


def _locked(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: LeaseTable, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _changes(fn: F) -> F:
    """`_locked`, then tell the listeners (`LeaseTable.subscribe`) that a lease may now be
    possible where it was not, after the lock is released."""
    locked = _locked(fn)

    @functools.wraps(fn)
    def wrapper(self: LeaseTable, *args: Any, **kwargs: Any) -> Any:
        out = locked(self, *args, **kwargs)
        for listener in self._listeners:
            listener()
        return out

    return wrapper  # type: ignore[return-value]

# ---------------------------------------------------------------------------- table


@dataclass
class _Live:
    """A group not yet accepted. `holds_slot` once first leased; `lease_id` is the current
    lease (None: free to lease now); `leases` maps every lease it was in to its min_version."""

    spec: GroupSpec
    holds_slot: bool = False
    lease_id: str | None = None
    deadline: float = 0.0
    leases: dict[str, int] = field(default_factory=dict)


class LeaseTable:
    def __init__(self, *, adapter_name: str, samples_per_group: int, groups_per_batch: int,
                 vocab_size: int, max_staleness: int = 0, max_buffered: int | None = None,
                 lease_timeout_s: float = 60.0, max_groups_per_lease: int = 8,
                 retry_after_ms: int = 200, current_version: int = 0,
                 clock: Callable[[], float] = time.time, id_prefix: str | None = None) -> None:
        """`max_buffered` (default (η+1)·B) caps accepted-but-not-taken groups: past it,
        leases are refused so rollout waits for the trainer (backpressure)."""
        if samples_per_group < 1 or groups_per_batch < 1 or vocab_size < 1 or max_staleness < 0:
            raise ValueError("samples_per_group, groups_per_batch, vocab_size must be >= 1 and "
                             "max_staleness >= 0")
        self.adapter_name = adapter_name
        self.n = samples_per_group
        self.groups_per_batch = groups_per_batch
        self.vocab_size = vocab_size
        self.max_staleness = max_staleness
        self.max_buffered = max_buffered if max_buffered is not None else (max_staleness + 1) * groups_per_batch
        self.lease_timeout_s = lease_timeout_s
        self.max_groups_per_lease = max_groups_per_lease
        self.retry_after_ms = retry_after_ms
        self.clock = clock
        # Lease ids stay unique across restarts that lose the table's state.
        self._id_prefix = id_prefix if id_prefix is not None else uuid.uuid4().hex[:8]
        self.version = current_version
        self._lock = threading.RLock()
        self._taken_at_version = 0
        self._seq = 0
        self._lease_seq = 0
        self._live: dict[str, _Live] = {}
        self._buffer: list[tuple[GroupSpec, TrajectoryGroupRecord]] = []
        self._accepted: set[str] = set()
        self._counters: Counter[str] = Counter()
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every change that can make a refused lease possible (groups
        added, accepted or refused, a batch taken, a new version, leases expired), on the
        thread that made it: it must be quick and thread-safe. The lease service uses it to
        answer a waiting LeasePrompts (a long poll) the moment work appears."""
        self._listeners.append(listener)

    # -- feeding and versions

    @_changes
    def add(self, prompt_uid: str, prompt_token_ids: Sequence[int], prompt_text: str = "",
            data_source: str = "", ground_truth: str = "",
            extra_info: dict[str, Any] | None = None) -> GroupSpec:
        """Queue one prompt as a new group `{prompt_uid}:{seq}`."""
        if not prompt_token_ids:
            raise ValueError(f"prompt {prompt_uid!r} has no token ids")
        self._seq += 1
        spec = GroupSpec(f"{prompt_uid}:{self._seq}", prompt_uid, tuple(prompt_token_ids), prompt_text,
                         data_source, ground_truth, dict(extra_info or {}))
        self._live[spec.group_id] = _Live(spec)
        return spec

    @_locked
    def wanted(self) -> int:
        """New groups to `add` so that every lease rule 2 allows can be filled."""
        fresh = sum(not g.holds_slot for g in self._live.values())
        return max(0, self._free_slots() - fresh)

    @_changes
    def set_version(self, version: int) -> None:
        """The learner published `version`. Buffered groups now too stale are dropped and
        their prompts queued again under new group ids."""
        if version < self.version:
            raise ValueError(f"version went back from {self.version} to {version}")
        if version == self.version:
            return
        self.version, self._taken_at_version = version, 0
        keep = []
        for spec, rec in self._buffer:
            if self._staleness(rec) > self.max_staleness:
                self._counters["dropped_stale_buffered"] += 1
                self.add(spec.prompt_uid, spec.prompt_token_ids, spec.prompt_text, spec.data_source,
                         spec.ground_truth, spec.extra_info)
            else:
                keep.append((spec, rec))
        self._buffer = keep

    # -- leasing

    def _slots_held(self) -> int:
        return sum(g.holds_slot for g in self._live.values()) + len(self._buffer)

    def _free_slots(self) -> int:
        if self._taken_at_version > self.max_staleness:
            return 0
        return max(0, (self.max_staleness + 1 - self._taken_at_version) * self.groups_per_batch
                   - self._slots_held())

    @_locked
    def lease(self, worker_id: str, max_groups: int = 0, now: float | None = None,
              count_refusal: bool = True) -> Lease | Refusal:
        """Up to `max_groups` (0: the configured cap) groups: expired or refused ones first,
        then new ones as rule 2 allows; or, when there is nothing to hand out, a Refusal that
        says why and when to retry (counted in `stats` unless `count_refusal` is False: a
        long poll looks many times and counts the answer it gives)."""
        now = self.clock() if now is None else now
        refuse = self._refuse if count_refusal else (lambda reason: Refusal(reason, self.retry_after_ms))
        want = min(max_groups or self.max_groups_per_lease, self.max_groups_per_lease)
        if self.adapter_name and self.version < 1:
            return refuse(RefusalReason.NO_ADAPTER_VERSION)
        if len(self._buffer) >= self.max_buffered:
            return refuse(RefusalReason.BACKPRESSURE)
        if self._taken_at_version > self.max_staleness:
            return refuse(RefusalReason.STALENESS)
        free = [g for g in self._live.values() if g.lease_id is None or g.deadline <= now]
        again = [g for g in free if g.holds_slot][:want]
        fresh = [g for g in free if not g.holds_slot][: min(want - len(again), self._free_slots())]
        if not again and not fresh:
            blocked = any(not g.holds_slot for g in free)
            return refuse(RefusalReason.STALENESS if blocked else RefusalReason.NOTHING_PENDING)
        self._lease_seq += 1
        lease_id = f"{self._id_prefix}-{self._lease_seq}"
        min_version = self.version
        deadline = now + self.lease_timeout_s
        for g in again + fresh:
            g.holds_slot, g.lease_id, g.deadline = True, lease_id, deadline
            g.leases[lease_id] = min_version
        self._counters["leases_granted"] += 1
        self._counters["groups_leased"] += len(again) + len(fresh)
        self._counters["groups_leased_again"] += len(again)
        return Lease(lease_id, worker_id, self.adapter_name, min_version, deadline, self.n,
                     tuple(g.spec for g in again + fresh))

    def _refuse(self, reason: RefusalReason) -> Refusal:
        self._counters[f"lease_refused_{reason.value}"] += 1
        return Refusal(reason, self.retry_after_ms)

    # -- accepting

    @_changes
    def accept(self, group: TrajectoryGroupRecord, now: float | None = None) -> AcceptResult:
        """Check one returned group and buffer it for the trainer, or say why not.

        A submission under a lease whose deadline passed is still taken if the group has not
        been accepted yet: the work is done, and exactly-once holds by group id."""
        now = self.clock() if now is None else now
        gid = group.group_id
        if gid in self._accepted:
            return self._result(gid, AckCode.ALREADY_EXISTS, "group already accepted")
        live = self._live.get(gid)
        if live is None:
            return self._result(gid, AckCode.FAILED_PRECONDITION, "unknown group id")
        if group.lease_id not in live.leases:
            return self._result(gid, AckCode.FAILED_PRECONDITION,
                                f"group was never leased under lease {group.lease_id!r}")
        problem = self._invalid(group, live.spec)
        if problem:
            self._release(live, group.lease_id)
            return self._result(gid, AckCode.INVALID_ARGUMENT, problem)
        oldest = min(s.adapter_version for s in group.samples)
        min_version = live.leases[group.lease_id]
        if oldest < min_version or self.version - oldest > self.max_staleness:
            self._counters["dropped_stale"] += 1
            self._release(live, group.lease_id)
            return self._result(gid, AckCode.FAILED_PRECONDITION,
                                f"too stale: sample version {oldest}, lease min_version {min_version}, "
                                f"learner at {self.version}, max_staleness {self.max_staleness}")
        if live.lease_id != group.lease_id or live.deadline <= now:
            self._counters["accepted_late"] += 1
        del self._live[gid]
        self._accepted.add(gid)
        self._buffer.append((live.spec, group))
        return self._result(gid, AckCode.OK)

    def _release(self, live: _Live, lease_id: str) -> None:
        # A refused group is free to lease again at once, unless another lease holds it now.
        if live.lease_id == lease_id:
            live.lease_id = None

    def _result(self, gid: str, status: AckCode, message: str = "") -> AcceptResult:
        self._counters[_COUNTER_OF[status]] += 1
        return AcceptResult(gid, status, message)

    def _invalid(self, g: TrajectoryGroupRecord, spec: GroupSpec) -> str | None:
        known = (1, self.version) if self.adapter_name else (0, 0)
        return invalid_group(g, spec, adapter_name=self.adapter_name, n=self.n, vocab_size=self.vocab_size,
                             versions=known)

    def _staleness(self, rec: TrajectoryGroupRecord) -> int:
        return self.version - min(s.adapter_version for s in rec.samples)

    # -- the trainer's side

    @_changes
    def take_batch(self, num_groups: int | None = None) -> list[TrajectoryGroupRecord] | None:
        """The oldest `num_groups` (default groups_per_batch) accepted groups, in arrival
        order, or None (nothing taken) while fewer are buffered."""
        k = num_groups or self.groups_per_batch
        if len(self._buffer) < k:
            return None
        batch, self._buffer = self._buffer[:k], self._buffer[k:]
        self._taken_at_version += 1
        self._counters["consumed"] += k
        return [rec for _, rec in batch]

    @_locked
    def stats(self) -> dict[str, int]:
        """Counters since the start of training (kept in checkpoints) and current gauges."""
        out = {k: 0 for k in _COUNTERS}
        out.update(self._counters)
        out.update(version=self.version, buffered=len(self._buffer),
                   leased=sum(g.lease_id is not None for g in self._live.values()),
                   waiting=sum(g.lease_id is None for g in self._live.values()))
        return out

    # -- checkpoints

    @_locked
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "taken_at_version": self._taken_at_version,
            "seq": self._seq, "lease_seq": self._lease_seq,
            "live": [{"spec": asdict(g.spec), "holds_slot": g.holds_slot, "lease_id": g.lease_id,
                      "deadline": g.deadline, "leases": g.leases} for g in self._live.values()],
            "buffer": [{"spec": asdict(s), "group": asdict(r)} for s, r in self._buffer],
            "accepted": sorted(self._accepted),
            "counters": dict(self._counters),
        }

    @_changes
    def expire_leases(self) -> int:
        """End every outstanding lease now (a restarted learner cannot know whether those
        workers are still at it): their groups are leased again first, in their order.
        A late submission under an old lease is still accepted once."""
        n = 0
        for g in self._live.values():
            if g.lease_id is not None:
                g.deadline, n = 0.0, n + 1
        return n

    @_changes
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.version, self._taken_at_version = int(state["version"]), int(state["taken_at_version"])
        self._seq, self._lease_seq = int(state["seq"]), int(state["lease_seq"])
        self._live = {}
        for d in state["live"]:
            spec = GroupSpec.from_dict(d["spec"])
            self._live[spec.group_id] = _Live(spec, bool(d["holds_slot"]), d["lease_id"],
                                              float(d["deadline"]), {k: int(v) for k, v in d["leases"].items()})
        self._buffer = [(GroupSpec.from_dict(d["spec"]), TrajectoryGroupRecord.from_dict(d["group"]))
                        for d in state["buffer"]]
        self._accepted = set(state["accepted"])
        self._counters = Counter({k: int(v) for k, v in state["counters"].items()})


def invalid_group(g: TrajectoryGroupRecord, spec: GroupSpec, *, adapter_name: str, n: int, vocab_size: int,
                  versions: tuple[int, int]) -> str | None:
    """Why a returned group cannot be taken as the answer to `spec` (None: it can): its adapter,
    sample count, token ids, log-probs and rewards, and every sample's version within
    `versions` (inclusive)."""
    if g.adapter_name != adapter_name:
        return f"adapter {g.adapter_name!r}, leased {adapter_name!r}"
    if len(g.samples) != n:
        return f"{len(g.samples)} samples, expected {n}"
    if spec.prompt_token_ids and tuple(g.prompt_token_ids) != spec.prompt_token_ids:
        return "prompt token ids differ from the leased ones"
    if not g.prompt_token_ids or not all(0 <= t < vocab_size for t in g.prompt_token_ids):
        return f"prompt token ids empty or outside [0, {vocab_size})"
    lo, hi = versions
    for i, s in enumerate(g.samples):
        if not s.response_token_ids:
            return f"sample {i}: no response tokens"
        if len(s.logprobs) != len(s.response_token_ids):
            return f"sample {i}: {len(s.logprobs)} logprobs for {len(s.response_token_ids)} tokens"
        if not all(0 <= t < vocab_size for t in s.response_token_ids):
            return f"sample {i}: response token id outside [0, {vocab_size})"
        if not all(finite32(x) for x in s.logprobs):
            return f"sample {i}: logprob not finite (as float32)"
        if not finite32(s.reward):
            return f"sample {i}: reward {s.reward!r} not finite (as float32)"
        if not lo <= s.adapter_version <= hi:
            return f"sample {i}: adapter version {s.adapter_version} unknown (known: {lo}..{hi})"
    return None



_COUNTER_OF = {s: "accepted" if s is AckCode.OK else s.name.lower() for s in AckCode}
_COUNTERS = ("leases_granted", "groups_leased", "groups_leased_again",
             *(f"lease_refused_{r.value}" for r in RefusalReason), *_COUNTER_OF.values(),
             "accepted_late", "dropped_stale", "dropped_stale_buffered", "consumed")
