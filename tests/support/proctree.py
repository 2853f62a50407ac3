"""Process-tree helpers (from /proc) for tests that check every process was stopped."""

from __future__ import annotations

import os
from pathlib import Path


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            pp = _ppid(int(d))
            if pp is not None:
                children.setdefault(pp, []).append(int(d))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def cpu_seconds(pids: set[int]) -> float:
    """utime + stime of these processes (seconds; ones that are gone count 0)."""
    ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(stat[11]) + int(stat[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def scratch_dirs(pids: set[int]) -> list[Path]:
    """`services.common.scratch` dirs (vLLM sockets, adapter caches) owned by any of `pids`."""
    import tempfile

    from services.common import scratch
    from services.rollout.adapters import CACHE_PREFIX
    from services.rollout.engine import IPC_PREFIX

    bases = {Path(tempfile.gettempdir()), scratch.ram_or_temp()}
    return [d for base in bases for prefix in (IPC_PREFIX, CACHE_PREFIX) for d in base.glob(f"{prefix}*")
            if scratch.owner(d.name, prefix) in pids]
