"""Scratch directories that do not outlive their process.

A rollout server keeps adapter bytes in /dev/shm (RAM) and vLLM binds its ZMQ sockets in the
temp dir. Removed at a clean exit, they stay behind when a process is SIGKILLed or crashes --
and a fleet that replaces dead replicas would fill RAM and /tmp with them. So such a directory
is named after its owner, `<prefix><pid-namespace>-<pid>-<random>`, and whoever claims a new
one first removes those of the same prefix whose owner is gone.

Only directories of this user, in this PID namespace (a pid means nothing across containers
that share a /dev/shm), whose process no longer exists are removed. A reused pid keeps a dead
owner's directory until that pid is free again: conservative, never wrong.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def pid_namespace() -> str:
    """This process's PID namespace id ("4026531836"), or "0" where /proc does not say."""
    try:
        m = re.search(r"\[(\d+)\]", os.readlink("/proc/self/ns/pid"))
    except OSError:
        return "0"
    return m.group(1) if m else "0"


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def owner(name: str, prefix: str) -> int | None:
    """The pid owning the scratch dir `name` (`<prefix><ns>-<pid>-<mkdtemp suffix>`) when it is
    one of this PID namespace's; None for any other name."""
    m = re.fullmatch(re.escape(prefix) + r"(\d+)-(\d+)-[A-Za-z0-9_]+", name)
    if m is None or m.group(1) != pid_namespace():
        return None
    return int(m.group(2))


def sweep(base: Path, prefix: str) -> list[Path]:
    """Remove `base/<prefix><ns>-<pid>-*` directories of this user and namespace whose pid is gone."""
    uid, removed = os.getuid(), []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for e in entries:
        pid = owner(e.name, prefix)
        if pid is None:
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if not e.is_dir(follow_symlinks=False) or st.st_uid != uid or pid_alive(pid):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(Path(e.path))
    if removed:
        log.info("removed %d scratch dir(s) left by dead processes in %s: %s", len(removed), base,
                 ", ".join(p.name for p in removed[:4]) + (" ..." if len(removed) > 4 else ""))
    return removed


def claim(base: Path | str, prefix: str) -> Path:
    """A new directory under `base` owned by this process (mode 0700), after sweeping dead owners'."""
    base = Path(base)
    sweep(base, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{pid_namespace()}-{os.getpid()}-", dir=base))


def ram_or_temp() -> Path:
    """/dev/shm where it is writable (RAM, so no disk write on the hot path), else the temp dir."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


# vLLM's engine makes POSIX shared memory (multiprocessing.shared_memory, "psm_*": its ~240 MiB
# broadcast ring) and semaphores ("sem.mp-*") in /dev/shm. Python's resource tracker unlinks them
# when the engine ends, unless the tracker itself is SIGKILLed with the replica's process group:
# then each killed replica leaves ~240 MiB of RAM behind (seen after `loraloop chaos`).
ENGINE_SHM = re.compile(r"psm_[0-9a-f]+|sem\.mp-[A-Za-z0-9_]+")


def shm_in_use(root: Path) -> set[str]:
    """Names under `root` that some process maps or holds open (every process we can read)."""
    used, prefix = set(), str(root).rstrip("/") + "/"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find(prefix)
                    if i >= 0:
                        used.add(line[i + len(prefix):].split()[0])
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(prefix):
                    used.add(target[len(prefix):].split()[0])
        except OSError:
            continue
    return used


def sweep_engine_shm(since: float, root: Path = Path("/dev/shm")) -> list[str]:
    """Remove vLLM's shared-memory segments and semaphores of this user made since `since` (wall
    clock) that no process maps or holds open any more: what a dead replica's engine left."""
    uid, candidates = os.getuid(), []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    for e in entries:
        if not ENGINE_SHM.fullmatch(e.name):
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if st.st_uid == uid and st.st_ctime >= since - 1.0:
            candidates.append(e.name)
    if not candidates:
        return []
    used, removed = shm_in_use(root), []
    for name in candidates:
        if name not in used:
            with contextlib.suppress(OSError):
                (root / name).unlink()
                removed.append(name)
    if removed:
        log.info("removed %d shared-memory file(s) a dead engine left in %s: %s", len(removed), root,
                 ", ".join(removed[:4]) + (" ..." if len(removed) > 4 else ""))
    return removed
