"""Reading a process's memory cheaply: the guard does it before every split."""

from __future__ import annotations

import os
import resource

__all__ = ["current_rss", "peak_rss", "reset_peak"]

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _StatmReader:
    """Keeps ``/proc/self/statm`` open: one ``pread`` costs a few microseconds.

    The descriptor resolves ``self`` when it is opened, so a forked child reopens it
    instead of reading its parent's numbers.
    """

    def __init__(self) -> None:
        self._fd: int | None = None
        self._pid = -1

    def rss(self) -> int | None:
        pid = os.getpid()
        if self._fd is None or pid != self._pid:
            try:
                self._fd = os.open("/proc/self/statm", os.O_RDONLY)
            except OSError:
                return None  # no procfs (macOS): the caller falls back to psutil
            self._pid = pid
        data = os.pread(self._fd, 128, 0)
        return int(data.split()[1]) * _PAGE_SIZE


_statm = _StatmReader()


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    rss = _statm.rss()
    if rss is not None:
        return rss
    import psutil  # slower, portable path

    return int(psutil.Process().memory_info().rss)


def reset_peak() -> bool:
    """Start a new peak: writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM`` (Linux 4.0+).

    The peak the kernel keeps is exact, where any sampling (the guard's checks, the supervisor
    at 10 Hz) can miss the top of a fast allocation.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False  # no procfs or not allowed: peak_rss() is then the process's lifetime peak
    return True


def peak_rss() -> int:
    """Peak resident set size of this process in bytes since ``reset_peak()`` (or its start)."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass  # no procfs: fall back to the lifetime peak below
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
