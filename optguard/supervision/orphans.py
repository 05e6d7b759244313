"""Processes re-parented to the supervisor (it is a child subreaper): whose they are, and
ending them once the trial that started them is over.

An orphan names its worker (and, when it was exec'd, its trial) in its inherited
environment; a forked one is pinned to the trial its worker ran when first seen. Zombies are
reaped.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import psutil

from optguard import channel, proctree
from optguard.supervision.workers import Worker

__all__ = ["ORPHAN_GRACE_S", "Orphans"]

ORPHAN_GRACE_S = 2.0


@dataclass
class _Orphan:
    proc: psutil.Process
    worker: str | None
    trial: str | None
    termed_at: float | None = None


def _signal_proc(proc: psutil.Process, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except psutil.Error:
        pass  # exited meanwhile


class Orphans:
    def __init__(
        self, run_id: str, on_ended: Callable[[Worker, int, str | None], None]
    ) -> None:
        self.run_id = run_id  # only processes carrying this run's marker are ever touched
        self.known: dict[int, _Orphan] = {}
        self.not_ours: set[int] = set()  # children of the caller (run_study from Python)
        self.on_ended = on_ended  # (owner, pid, trial): log it in the owner's log

    def __bool__(self) -> bool:
        return bool(self.known)

    def sweep(
        self, now: float, children: list[int], workers: Mapping[str, Worker], live: set[int]
    ) -> None:
        """``children``: this process's children now; ``workers`` by uid (exited ones too);
        ``live``: pids of this process's own children that are not orphans (its workers
        still running, its keeper)."""
        for gone in set(self.known) - set(children):
            del self.known[gone]  # reaped: no longer a child of this process
        self.not_ours &= set(children)
        for pid in children:
            if pid in live or pid in self.not_ours:
                continue
            try:
                child = self.known[pid].proc if pid in self.known else psutil.Process(pid)
                if child.status() == psutil.STATUS_ZOMBIE:
                    if pid in self.known:  # only ours: a caller's child keeps its exit status
                        os.waitpid(child.pid, os.WNOHANG)
                        self.known.pop(child.pid, None)
                    continue
            except (psutil.Error, ChildProcessError):
                continue  # gone already
            orphan = self.known.get(child.pid)
            if orphan is None:
                run, uid, trial = proctree.environ_of(
                    child.pid, channel.RUN_ENV, channel.WORKER_ENV, channel.TRIAL_ENV
                )
                if run != self.run_id:
                    self.not_ours.add(pid)  # not started by this run: never signalled
                    continue
                owner = workers.get(uid or "")
                if trial is None and owner is not None and owner.trial is not None:
                    trial = str(owner.trial.number)
                orphan = self.known[child.pid] = _Orphan(child, uid, trial)
            if orphan.termed_at is not None:
                if now - orphan.termed_at > ORPHAN_GRACE_S:
                    _signal_proc(child, signal.SIGKILL)
                continue
            owner = workers.get(orphan.worker or "")
            running = None if owner is None or owner.trial is None else str(owner.trial.number)
            if running is not None and running == orphan.trial:
                continue  # the trial that started it is still running
            _signal_proc(child, signal.SIGTERM)
            orphan.termed_at = now
            if owner is not None:
                self.on_ended(owner, child.pid, orphan.trial)

    def kill_all(self) -> None:
        """The run is over: nothing a trial started outlives it."""
        for orphan in self.known.values():
            _signal_proc(orphan.proc, signal.SIGKILL)
