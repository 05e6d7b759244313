"""Process trees optguard started: their memory, and ending them.

Only processes descended from optguard's own workers are ever signalled: a worker's process
group (each worker leads its own session), the descendants a worker finds under itself, and
orphans re-parented to the supervisor because it is a child subreaper. Never by name or port.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import time
from typing import Iterable

import psutil

__all__ = [
    "become_subreaper",
    "die_with_parent",
    "children_map",
    "tree_pids",
    "has_children",
    "rss_of",
    "pss_of",
    "terminate",
    "kill_group",
    "environ_of",
]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _prctl(option: int, value: int) -> bool:
    """``prctl(option, value)``; False where there is none (not Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    """Make orphaned descendants (double-forked daemons) re-parent to this process.

    Without it (not Linux) orphans go to init and cannot be found afterwards.
    """
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent (the supervisor, ``parent``) dies; Linux only."""
    if not _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL):
        return  # not Linux: the worker outlives a killed supervisor
    if os.getppid() != parent:
        os._exit(1)  # the parent died before the request took effect


def children_map() -> dict[int, list[int]]:
    """Each process's children, from one pass over ``/proc/<pid>/stat``.

    psutil makes this same pass for every ``children()`` call; a supervisor that lists several
    trees each second makes it once and walks them all (``tree_pids``).
    """
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
            ppid = int(stat[stat.rindex(b")") + 2 :].split(None, 2)[1])
        except (OSError, ValueError, IndexError):
            continue  # exited while listing: not part of any tree now
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree_pids(pid: int, kids: dict[int, list[int]] | None = None) -> list[int]:
    """``pid`` and all its descendants (empty when ``pid`` is gone), from ``kids``
    (``children_map()``) when the caller already listed them."""
    if not os.path.exists(f"/proc/{pid}"):
        return []
    if kids is None:
        kids = children_map()
    pids, stack = [pid], [pid]
    while stack:
        for child in kids.get(stack.pop(), ()):
            pids.append(child)
            stack.append(child)
    return pids


def has_children() -> bool:
    """Whether this process has any child, without scanning ``/proc`` as psutil must.

    ``waitid(WNOHANG | WNOWAIT)`` reaps nothing; it fails with ECHILD only when there is none.
    """
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def rss_of(pids: Iterable[int]) -> int:
    """Summed resident memory from ``/proc/<pid>/statm``: cheap, but counts shared pages once
    per process (copy-on-write children overcount), hence ``pss_of`` before acting."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as fh:
                total += int(fh.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            continue  # exited between listing and reading: it holds no memory
    return total


def pss_of(pids: Iterable[int]) -> int:
    """Summed proportional set size: shared pages split between the processes sharing them."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
                for line in fh:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, IndexError, ValueError):
            continue  # exited, or no smaps_rollup (old kernel): counted as nothing
    return total


def environ_of(pid: int, *names: str) -> tuple[str | None, ...]:
    """Variables of a process's inherited environment: whose descendant it is, and when."""
    try:
        env = psutil.Process(pid).environ()
    except psutil.Error:
        return tuple(None for _ in names)
    return tuple(env.get(name) for name in names)


def kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone (or only zombies are left): nothing to signal


def terminate(procs: list[psutil.Process], grace: float) -> tuple[int, int]:
    """SIGTERM, wait ``grace`` seconds, SIGKILL the survivors, reap. Returns (termed, killed)."""
    if not procs:
        return 0, 0
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            continue  # already gone
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            continue
    if alive:
        psutil.wait_procs(alive, timeout=max(1.0, grace))
    return len(procs), len(alive)


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid):
            return True
        time.sleep(0.02)
    return not psutil.pid_exists(pid)
