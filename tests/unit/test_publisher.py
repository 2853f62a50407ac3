"""The learner's Publisher: a version's publish runs beside the next step, versions stay the
broker's, rows are written once committed, and a failed publish stops the loop.

The broker and the policy are stand-ins here (the logic around them is what is tested); the
real publish path runs in every e2e test (test_demo, test_replicas, test_two_runs)."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from services.learner.app import Publisher


class _Table:
    def __init__(self) -> None:
        self.versions: list[int] = []

    def set_version(self, v: int) -> None:
        if not self.versions or v != self.versions[-1]:
            self.versions.append(v)


class _Coord:
    """Commits version latest + 1 per publish, as the broker does for the epoch's holder;
    `gate` (when set) holds each publish until the test releases it."""

    def __init__(self, latest: int = 4, skip: int | None = None) -> None:
        self.cfg = SimpleNamespace(adapter_name="policy")
        self.table = _Table()
        self.latest, self.skip = latest, skip
        self.gate: threading.Event | None = None
        self.started = threading.Event()
        self.published: list[tuple[int, int, bytes]] = []
        self.rows: list[dict] = []
        self.metrics = SimpleNamespace(write=self.rows.append)
        self.fail: Exception | None = None

    def publish(self, adapter_dir: Path, step: int) -> int:
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.fail is not None:
            raise self.fail
        self.latest += 1
        if self.skip is not None and self.latest == self.skip:
            self.latest += 1  # someone else committed a version in between
        self.published.append((self.latest, step, (adapter_dir / "w.bin").read_bytes()))
        self.table.set_version(self.latest)
        return self.latest


class _Policy:
    def write_adapter(self, sd: dict[str, torch.Tensor], out_dir: str) -> Path:
        (Path(out_dir) / "w.bin").write_bytes(sd["w"].numpy().tobytes())
        return Path(out_dir)


def _sd(x: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([x])}


def test_first_publish_learns_the_version_then_the_next_return_at_once() -> None:
    coord = _Coord(latest=4)
    pub = Publisher(coord, _Policy())
    assert pub.submit(_sd(0.0), step=0, with_row=False) == 5  # synchronous: the broker says 5
    assert coord.published[0][0] == 5 and coord.rows == []
    coord.gate = threading.Event()
    coord.started.clear()
    v = pub.submit(_sd(1.0), step=1)
    # Returned while the publish is still held: off the step's critical path. The lease table
    # already counts from the new version.
    assert v == 6 and coord.started.wait(5) and len(coord.published) == 1
    assert coord.table.versions == [5, 6]
    pub.attach_row({"step": 1, "policy_version": v})
    coord.gate.set()
    pub.wait()
    assert [p[:2] for p in coord.published] == [(5, 0), (6, 1)]
    assert coord.rows[0]["step"] == 1 and coord.rows[0]["policy_version"] == 6
    assert coord.rows[0]["timing_s/publish"] >= 0


def test_versions_commit_in_order_with_the_weights_of_their_step() -> None:
    coord = _Coord(latest=0)
    pub = Publisher(coord, _Policy())
    pub.submit(_sd(0.0), step=0, with_row=False)
    for step in range(1, 6):
        assert pub.submit(_sd(float(step)), step) == step + 1
        pub.attach_row({"step": step})
    pub.wait()
    assert [(v, s) for v, s, _ in coord.published] == [(k + 1, k) for k in range(6)]
    assert [torch.frombuffer(bytearray(b), dtype=torch.float32).item() for *_, b in coord.published] == \
        [float(k) for k in range(6)]
    assert [r["step"] for r in coord.rows] == [1, 2, 3, 4, 5]


def test_a_failed_publish_stops_the_next_step() -> None:
    coord = _Coord()
    pub = Publisher(coord, _Policy())
    pub.submit(_sd(0.0), step=0, with_row=False)
    coord.fail = ConnectionError("broker unavailable")
    pub.submit(_sd(1.0), step=1)
    pub.attach_row({"step": 1})
    with pytest.raises(RuntimeError, match="publishing policy@v6 failed: broker unavailable"):
        pub.wait()
    assert coord.rows == []  # no row for a version that was never committed


def test_a_version_the_broker_numbers_otherwise_stops_the_learner() -> None:
    coord = _Coord(latest=4, skip=6)
    pub = Publisher(coord, _Policy())
    pub.submit(_sd(0.0), step=0, with_row=False)
    pub.submit(_sd(1.0), step=1, with_row=False)
    with pytest.raises(RuntimeError, match="committed v7, v6 was expected"):
        pub.wait()


def test_a_step_stopped_before_its_row_does_not_hang_the_publish() -> None:
    coord = _Coord()
    pub = Publisher(coord, _Policy())
    pub.submit(_sd(0.0), step=0, with_row=False)
    pub.submit(_sd(1.0), step=1)  # no attach_row: the loop was stopped
    assert pub.wait() < 5
    assert len(coord.published) == 2 and coord.rows == []
