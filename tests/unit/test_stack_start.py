"""`loraloop up`'s start report: the replica's own start as it logs it, and its process age."""

from __future__ import annotations

import os
import time

import pytest

from services.rollout.app import process_age_s
from services.stack import first_step_line, replica_start


def test_replica_start_reads_what_the_replica_logged(tmp_path) -> None:
    log = tmp_path / "rollout-0.log"
    assert replica_start(log) is None  # not there yet
    log.write_text("INFO vllm ...\n2026-12-07 05:15:03 INFO rollout services.rollout.app: engine ready 27.4 s "
                   "after the process started (vLLM engine 18.6 s)\n")
    assert replica_start(log) == (27.4, 18.6)
    with open(log, "a") as f:  # the same run dir, used again: the line of this run comes last
        f.write("2026-12-08 04:55:00 INFO rollout services.rollout.app: engine ready 39.2 s after the process "
                "started (vLLM engine 20.6 s)\n")
    assert replica_start(log) == (39.2, 20.6)
    log.write_text("engine started for /m in 18.6 s\n")
    assert replica_start(log) is None


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="Linux /proc")
def test_process_age_grows_with_the_process() -> None:
    a = process_age_s()
    time.sleep(0.3)
    b = process_age_s()
    assert a is not None and b is not None and 0 <= a < b and b - a == pytest.approx(0.3, abs=0.1)


def test_the_first_step_line_says_what_the_stack_added_to_the_replicas_start() -> None:
    line = first_step_line(42.5, (40.1, 22.0), 0.3)
    assert line.startswith("first step 42.5 s after the command (rollout-0: engine ready 40.1 s after its process "
                           "started 0.3 s after the command, vLLM's engine start 22.0 s of it; +2.1 s after that")
    assert line.endswith("goal <= 5 s: ok)")
    assert first_step_line(48.8, (34.1, 19.0), 0.2).endswith("+14.5 s after that, goal <= 5 s: MISSED)")
    assert first_step_line(3.0, None, 0.1) == "first step 3.0 s after the command"
