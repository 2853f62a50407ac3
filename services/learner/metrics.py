"""Per-step metrics: one JSON object per line in <run_dir>/metrics.jsonl, and TensorBoard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

REQUIRED = ("step", "policy_version", "reward/mean", "actor/pg_loss", "actor/entropy", "actor/ppo_kl",
            "actor/grad_norm", "response_length/mean", "staleness/mean", "timing_s/step", "perf/tokens_per_s")


class MetricsWriter:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is in the train extra; metrics.jsonl is enough
                self._tb = None

    def write(self, row: dict[str, Any]) -> None:
        """One step's row; `time` (Unix seconds, when it was written) is added for tools that
        line steps up with events outside the learner (e.g. `loraloop bench traffic`)."""
        clean = {k: (float(v) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
        clean.setdefault("time", round(time.time(), 3))
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, row["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
