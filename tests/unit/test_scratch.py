"""Scratch dirs named after their process: a claim sweeps those whose process is gone, and
nothing else."""

from __future__ import annotations

import os
import subprocess
import sys

from services.common import scratch

PREFIX = "loraloop-test-"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_claim_sweeps_dirs_of_dead_processes_and_keeps_the_rest(tmp_path):
    ns = scratch.pid_namespace()
    dead, live = _dead_pid(), os.getpid()
    dead_dir = tmp_path / f"{PREFIX}{ns}-{dead}-abc"
    keep = [
        tmp_path / f"{PREFIX}{ns}-{live}-abc",  # a live owner
        tmp_path / f"{PREFIX}1-{dead}-abc",  # another PID namespace: its pids are not ours to judge
        tmp_path / f"loraloop-other-{ns}-{dead}-abc",  # another prefix
        tmp_path / f"{PREFIX}notapid",  # not one of ours
    ]
    for d in [dead_dir, *keep]:
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "f").write_bytes(b"x")
    stray = tmp_path / f"{PREFIX}{ns}-{dead}-file"  # a file, not a dir
    stray.write_bytes(b"x")

    mine = scratch.claim(tmp_path, PREFIX)

    assert not dead_dir.exists()
    assert all(d.is_dir() for d in keep) and stray.is_file()
    assert mine.is_dir() and mine.name.startswith(f"{PREFIX}{ns}-{os.getpid()}-")
    assert oct(mine.stat().st_mode & 0o777) == oct(0o700)
    # A second claim keeps the first (its owner, this process, is alive).
    second = scratch.claim(tmp_path, PREFIX)
    assert mine.is_dir() and second != mine


def test_pid_alive():
    assert scratch.pid_alive(os.getpid())
    assert not scratch.pid_alive(_dead_pid())
    assert not scratch.pid_alive(0) and not scratch.pid_alive(-1)


def test_sweep_of_a_missing_base_is_empty(tmp_path):
    assert scratch.sweep(tmp_path / "nope", PREFIX) == []


def test_engine_shm_sweep_removes_only_unused_engine_files_made_since(tmp_path):
    """vLLM's psm_*/sem.mp-* files a dead engine left (nobody maps or holds them) go; one this
    process maps, one held open, one made before `since`, and other names stay."""
    import mmap
    import time

    from services.common.scratch import sweep_engine_shm

    old = tmp_path / "psm_0123ab"
    old.write_bytes(b"x" * 4096)
    since = old.stat().st_ctime + 1.5  # the sweep allows 1 s of clock slack before `since`
    time.sleep(0.6)
    for name in ("psm_dead01", "sem.mp-dead_1", "psm_mapped", "sem.mp-open", "loraloop-models", "psm_notes.txt"):
        (tmp_path / name).write_bytes(b"x" * 4096)
    with open(tmp_path / "psm_mapped", "r+b") as f, open(tmp_path / "sem.mp-open", "rb"):
        m = mmap.mmap(f.fileno(), 4096)
        try:
            removed = sweep_engine_shm(since, root=tmp_path)
        finally:
            m.close()
    assert sorted(removed) == ["psm_dead01", "sem.mp-dead_1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loraloop-models", "psm_0123ab", "psm_mapped",
                                                          "psm_notes.txt", "sem.mp-open"]
