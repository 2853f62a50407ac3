"""Per-step metrics: one JSON object per line in <run_dir>/metrics.jsonl, and TensorBoard.
Validation rounds (val/*) go to <run_dir>/val_metrics.jsonl, so every row of metrics.jsonl
stays a training step's."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

REQUIRED = ("step", "policy_version", "reward/mean", "actor/pg_loss", "actor/entropy", "actor/ppo_kl",
            "actor/grad_norm", "response_length/mean", "staleness/mean", "timing_s/step", "perf/tokens_per_s")


class MetricsWriter:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.val_path = Path(run_dir) / "val_metrics.jsonl"
        self._lock = threading.Lock()  # the publisher's thread and the lease service's write rows
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is in the train extra; metrics.jsonl is enough
                self._tb = None

    def write(self, row: dict[str, Any], val: bool = False) -> None:
        """One step's row (with `val`, a validation round's, to val_metrics.jsonl); `time` (Unix
        seconds, when it was written) is added for tools that line steps up with events outside
        the learner (e.g. `loraloop bench traffic`)."""
        clean = {k: (float(v) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
        clean.setdefault("time", round(time.time(), 3))
        with self._lock:
            with open(self.val_path if val else self.path, "a") as f:
                f.write(json.dumps(clean) + "\n")
            if self._tb is not None:
                for k, v in clean.items():
                    if k not in ("step", "time") and isinstance(v, (int, float)):
                        self._tb.add_scalar(k, v, row["step"])
                self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
    path = Path(run_dir) / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
