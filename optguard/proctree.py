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
    "kill_pid",
    "environ_of",
    "freeze_peak",
    "has_exited",
    "hit_cpu_limit",
    "oom_kills",
    "start_time",
    "with_marker",
    "channels_of",
    "unix_sockets",
    "state_of",
]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PAGE = os.sysconf("SC_PAGE_SIZE")
STOP_WAIT_S = 0.5  # freeze_peak: how long a SIGSTOP may take to land (a page fault ending)


def _prctl(option: int, value: int) -> bool:
    """``prctl(option, value)``; False where there is none (not Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def become_subreaper(on: bool = True) -> bool:
    """Make orphaned descendants (double-forked daemons) re-parent to this process (``on``),
    or stop doing so once the run is over (``run_study`` may return to a caller that lives on).

    Without it (not Linux) orphans go to init and cannot be found afterwards.
    """
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1 if on else 0)


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


def kill_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # gone already (or a zombie's pid reused by another user's process)


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


def _status_kb(pid: int, *keys: bytes) -> int:
    """The first of ``keys`` found in ``/proc/<pid>/status``, in bytes (0 if none)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            fields = dict(line.split(b":", 1) for line in fh if b":" in line)
    except OSError:
        return 0  # gone: it holds no memory
    for key in keys:
        if key in fields:
            return int(fields[key].split()[0]) * 1024
    return 0


def freeze_peak(pgid: int | None, pids: Iterable[int]) -> int:
    """Stop a process tree (SIGSTOP: no handler, no GIL, takes effect at once) and return the
    sum of its processes' peak resident memory (``VmHWM``), read while nothing can grow.

    Called just before a SIGKILL, so the peak recorded for a killed trial is never below what
    the kernel saw: sampling at 10 Hz misses the last burst of a fast allocation.
    """
    pids = list(dict.fromkeys(pids))
    if pgid is not None:
        kill_group(pgid, signal.SIGSTOP)
    for pid in pids:
        kill_pid(pid, signal.SIGSTOP)
    # SIGSTOP takes effect when the process next leaves the kernel: a page fault in progress
    # completes first. Read only once each process is stopped (or gone).
    deadline = time.monotonic() + STOP_WAIT_S
    waiting = list(pids)
    while waiting and time.monotonic() < deadline:
        waiting = [pid for pid in waiting if _state(pid) not in (b"T", b"t", b"Z", b"X", b"")]
        if waiting:
            time.sleep(0.001)
    return sum(_status_kb(pid, b"VmHWM", b"VmRSS") for pid in pids)


def _state(pid: int) -> bytes:
    """The one-letter state of ``pid`` from ``/proc/<pid>/stat``; empty when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return b""


def has_exited(pid: int) -> bool:
    """Whether a child has exited, without reaping it: its ``/proc`` entry stays readable
    (``hit_cpu_limit``) until ``Popen.poll`` reaps it."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True  # already reaped


def hit_cpu_limit(pid: int) -> bool:
    """Whether an exited (not yet reaped) process used up its ``RLIMIT_CPU`` hard limit,
    after which the kernel sends SIGKILL."""
    try:
        with open(f"/proc/{pid}/limits", "rb") as fh:
            line = next((x for x in fh if x.startswith(b"Max cpu time")), b"")
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except OSError:
        return False  # reaped already: cannot tell
    parts = line.split()
    hard = parts[4] if len(parts) > 4 else b"unlimited"
    if not hard.isdigit():
        return False
    used = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return used >= int(hard) - 0.5


def oom_kills() -> int:
    """The kernel's count of OOM kills since boot (``/proc/vmstat``); -1 where unknown."""
    try:
        with open("/proc/vmstat", "rb") as fh:
            for line in fh:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass  # no /proc/vmstat: OOM kills cannot be told apart
    return -1


def start_time(pid: int) -> bytes | None:
    """The process's start time in clock ticks since boot: with its pid, a name no later
    process can reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def with_marker(marker: str, value: str) -> list[int]:
    """Processes whose inherited environment has ``marker=value``: the trees one optguard run
    started, found even after they left its process groups and lost their parents."""
    needle = f"{marker}={value}".encode()
    found = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue  # exited, or a kernel thread
    return found


def channels_of(pid: int) -> dict[int, str] | None:
    """A process's open pipes and sockets, fd -> ``pipe:[inode]``/``socket:[inode]``: two
    processes holding the same one can talk. None when it is gone (or not ours to read)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    found: dict[int, str] = {}
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed while listing
        if link.startswith(("pipe:", "socket:")):
            found[int(fd)] = link
    return found


def unix_sockets() -> set[str] | None:
    """The ``socket:[inode]`` names of this network namespace's Unix sockets (the others are
    TCP/UDP, such as a database connection); None where ``/proc/net/unix`` cannot be read."""
    try:
        with open("/proc/net/unix", "rb") as fh:
            next(fh, None)  # the header
            return {f"socket:[{line.split()[6].decode()}]" for line in fh if len(line.split()) > 6}
    except OSError:
        return None


def state_of(pid: int) -> str | None:
    """The one-letter state of ``/proc/<pid>/stat`` (``R`` running, ``S`` sleeping, ``Z``
    zombie, ...); None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        return stat[stat.rindex(b")") + 2 :].split(None, 1)[0].decode()
    except (OSError, ValueError, IndexError):
        return None  # exited meanwhile
