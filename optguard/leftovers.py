"""What a trial left running: the processes kept for the next trials, and those ended.

A trial may leave processes running on purpose: the idle workers of a pool kept for the next
trials (joblib/loky's reusable executor, a ``multiprocessing`` pool in a global, a
``DataLoader(persistent_workers=True)``) and the resource tracker beside them. Ending those
restarts the pool every trial (several times slower, ``resource_tracker`` tracebacks in the
``.out`` file). What else it left (a ``sleep 1000``, a server, the workers of a pool it
dropped) is ended. The rule reads facts about each process (``gather``), never its name;
``decide`` applies it and is pure.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import psutil

from optguard import proctree

__all__ = [
    "ProcFacts", "Verdict", "decide", "gather", "start_times", "worker_channels", "KEPT_POOL",
]

# Why, as logged: the first that applies decides.
OWN = "alive before the first trial"
EXITED = "exited, left to its parent to reap"
NOT_KEEPING = "--no-keep-pools"
MEMORY = "the trial was pruned for memory, which may be held there"
PARENT_ENDED = "its parent is neither the worker nor a kept process"
NOT_CONNECTED = "no pipe or socket to the worker"
BUSY = "still running"
KEPT_POOL = "idle, with a pipe or socket to the worker"

# A process seen running (``R``) is looked at again after these pauses: an idle pool worker
# that has just handed back a result is running for a few milliseconds.
BUSY_LOOKS_S = (0.02, 0.03, 0.05)


@dataclass(frozen=True)
class ProcFacts:
    """One descendant of the worker, as seen once its trial is over."""

    pid: int
    ppid: int
    own: bool = False  # alive before the worker's first trial (its objective's module)
    zombie: bool = False
    # Holds a pipe or Unix socket the worker holds too (its stdio, its pipes to the
    # supervisor and its storage connection left out): a channel the worker can still use.
    connected: bool = False
    busy: bool = False  # running each time it was looked at: a task is not over


@dataclass(frozen=True)
class Verdict:
    keep: bool
    why: str


def decide(
    procs: Iterable[ProcFacts], worker_pid: int, keep_pools: bool, memory_pruned: bool
) -> dict[int, Verdict]:
    """Keep or end each process. Kept: an idle process the worker still holds a pipe or
    socket to, whose parent is the worker or itself kept (a forkserver's pool workers), and
    what was alive before the first trial. After a trial pruned for memory nothing the
    trials started is kept: the leak may be a pool worker's."""
    by_pid = {p.pid: p for p in procs}
    verdicts: dict[int, Verdict] = {}

    def judge(pid: int, seen: frozenset[int]) -> Verdict:
        if pid in verdicts:
            return verdicts[pid]
        proc = by_pid[pid]
        if proc.own:
            verdict = Verdict(True, OWN)
        elif proc.zombie:
            verdict = Verdict(True, EXITED)
        elif not keep_pools:
            verdict = Verdict(False, NOT_KEEPING)
        elif memory_pruned:
            verdict = Verdict(False, MEMORY)
        elif proc.ppid != worker_pid and not (
            proc.ppid in by_pid
            and proc.ppid not in seen  # a cycle cannot happen in a process tree; stop anyway
            and judge(proc.ppid, seen | {pid}).keep
            and not by_pid[proc.ppid].zombie
        ):
            verdict = Verdict(False, PARENT_ENDED)
        elif not proc.connected:
            verdict = Verdict(False, NOT_CONNECTED)
        elif proc.busy:
            verdict = Verdict(False, BUSY)
        else:
            verdict = Verdict(True, KEPT_POOL)
        verdicts[pid] = verdict
        return verdict

    for pid in by_pid:
        judge(pid, frozenset())
    return verdicts


def start_times(procs: Iterable[psutil.Process]) -> dict[int, float]:
    """pid -> start time: a process recognised later even if its pid was reused meanwhile."""
    times: dict[int, float] = {}
    for proc in procs:
        try:
            times[proc.pid] = proc.create_time()
        except psutil.Error:
            continue  # exited meanwhile
    return times


def worker_channels(pid: int, ignore: Collection[str] = ()) -> set[str]:
    """The pipes and sockets of the worker ``pid`` that can make a child "connected": not its
    stdio (every child inherits it) nor those in ``ignore``."""
    held = proctree.channels_of(pid) or {}
    return {link for fd, link in held.items() if fd > 2 and link not in ignore}


def gather(
    procs: Iterable[psutil.Process],
    own: Mapping[int, float],
    channels: set[str],
    look: bool = True,
) -> list[ProcFacts]:
    """Facts about the worker's descendants ``procs``. ``own``: pid -> start time of those
    alive before the first trial; ``channels``: ``worker_channels()``. Without ``look`` (every
    process will be ended anyway) pipes and states are not read. Gone processes are left out.
    """
    facts: list[ProcFacts] = []
    unix: set[str] | None = None
    unix_read = False
    for proc in procs:
        try:
            ppid, started = proc.ppid(), proc.create_time()
        except psutil.Error:
            continue  # exited meanwhile: nothing to keep or end
        state = proctree.state_of(proc.pid)
        if state is None:
            continue
        fact = ProcFacts(proc.pid, ppid, own=own.get(proc.pid) == started, zombie=state == "Z")
        if look and not fact.own and not fact.zombie:
            shared = set((proctree.channels_of(proc.pid) or {}).values()) & channels
            if any(link.startswith("socket:") for link in shared) and not unix_read:
                unix, unix_read = proctree.unix_sockets(), True
            connected = any(
                link.startswith("pipe:") or unix is None or link in unix for link in shared
            )
            fact = ProcFacts(fact.pid, ppid, connected=connected, busy=state == "R")
        facts.append(fact)
    return _look_again(facts)


def _look_again(facts: list[ProcFacts]) -> list[ProcFacts]:
    """``busy`` stays only on processes running at every look (a CPU-bound task)."""
    for pause in BUSY_LOOKS_S:
        running = [f for f in facts if f.busy and f.connected]
        if not running:
            break
        time.sleep(pause)
        still = {f.pid for f in running if proctree.state_of(f.pid) == "R"}
        facts = [
            f if not f.busy or f.pid in still else ProcFacts(f.pid, f.ppid, connected=f.connected)
            for f in facts
        ]
    return facts
