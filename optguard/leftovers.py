"""What a trial left running: the processes kept for the next trials, and those ended.

A trial may leave processes running on purpose: the workers of a pool kept for the next
trials (joblib/loky's reusable executor, a ``multiprocessing`` pool in a global, a
``DataLoader(persistent_workers=True)``) and the resource tracker beside them. Ending those
restarts the pool every trial (several times slower, ``resource_tracker`` tracebacks in the
``.out`` file), and can break it for good: a ``multiprocessing`` pool whose idle worker died
holding the queue's lock hangs, a persistent ``DataLoader`` raises on its next epoch. What
else it left (a ``sleep 1000``, a server, the workers of a pool it dropped) is ended. The
rule reads facts about each process (``gather``), never its name; ``decide`` is pure.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace

import psutil

from optguard import proctree

__all__ = [
    "ProcFacts", "Verdict", "decide", "gather", "start_times", "worker_channels", "KEPT_POOL",
]  # fmt: skip

# Why, as logged: the first that applies decides.
OWN = "alive before the first trial"
EXITED = "exited, left to its parent to reap"
NOT_KEEPING = "--no-keep-pools"
PARENT_ENDED = "its parent is neither the worker nor a kept process"
NOT_CONNECTED = "shares no pipe or socket with the worker"
TOO_BIG = "the biggest of the kept processes, which would start the next trial above --max-rss"
KEPT_POOL = "shares a pipe or socket with the worker: a pool's"


@dataclass(frozen=True)
class ProcFacts:
    """One descendant of the worker, as seen once its trial is over."""

    pid: int
    ppid: int
    own: bool = False  # alive before the worker's first trial (its objective's module)
    zombie: bool = False
    # Holds a pipe or Unix socket the worker holds too (not its stdio, nor what it held
    # before its first trial: its pipes to the supervisor, its storage connection).
    connected: bool = False
    memory: int = 0  # bytes: resident, or proportional where the resident sum is too big


@dataclass(frozen=True)
class Verdict:
    keep: bool
    why: str


def decide(
    procs: Iterable[ProcFacts], worker_pid: int, keep_pools: bool, room: int | None = None
) -> dict[int, Verdict]:
    """Keep or end each process.

    Kept: what was alive before the first trial; with ``keep_pools``, a process the worker
    still holds a pipe or socket to, whose parent is the worker or itself kept (a
    forkserver's pool workers). ``room``: the memory kept processes (those alive before the
    first trial included) may hold together, ``--max-rss`` less the worker's own; the biggest
    are ended until they fit (a leak in a pool worker would otherwise prune the next trial).
    """
    by_pid = {p.pid: p for p in procs}
    too_big: set[int] = set()
    while True:
        verdicts = _structure(by_pid, worker_pid, keep_pools, too_big)
        kept = [by_pid[pid] for pid, v in verdicts.items() if v.keep and v.why != EXITED]
        over = room is not None and sum(p.memory for p in kept) > room
        candidates = [p for p in kept if verdicts[p.pid].why == KEPT_POOL]
        if not over or not candidates:
            return verdicts
        too_big.add(max(candidates, key=lambda p: (p.memory, p.pid)).pid)


def _structure(
    by_pid: Mapping[int, ProcFacts], worker_pid: int, keep_pools: bool, too_big: Collection[int]
) -> dict[int, Verdict]:
    verdicts: dict[int, Verdict] = {}

    def judge(pid: int, seen: frozenset[int]) -> Verdict:
        if pid in verdicts:
            return verdicts[pid]
        proc = by_pid[pid]
        parent = by_pid.get(proc.ppid)
        if proc.own:
            verdict = Verdict(True, OWN)
        elif proc.zombie:
            verdict = Verdict(True, EXITED)
        elif not keep_pools:
            verdict = Verdict(False, NOT_KEEPING)
        elif proc.ppid != worker_pid and (
            parent is None
            or parent.zombie
            or proc.ppid in seen  # no cycle in a process tree; never loop all the same
            or not judge(proc.ppid, seen | {pid}).keep
        ):
            verdict = Verdict(False, PARENT_ENDED)
        elif not proc.connected:
            verdict = Verdict(False, NOT_CONNECTED)
        elif pid in too_big:
            verdict = Verdict(False, f"{TOO_BIG} ({proc.memory / 1e6:.0f}MB)")
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
    """The pipes and sockets of the worker ``pid`` that make a child "connected": not its
    stdio (every child inherits it) nor those in ``ignore``."""
    held = proctree.channels_of(pid) or {}
    return {link for fd, link in held.items() if fd > 2 and link not in ignore}


def gather(
    procs: Iterable[psutil.Process],
    own: Mapping[int, float],
    channels: set[str],
    room: int | None = None,
    look: bool = True,
) -> list[ProcFacts]:
    """Facts about the worker's descendants ``procs`` (gone ones left out). ``own``: pid ->
    start time of those alive before the first trial; ``channels``: ``worker_channels()``;
    ``room`` as for ``decide``: past it, resident memory (which counts pages shared after a
    fork once per process) is read again as proportional. Without ``look`` (all will be
    ended) neither pipes nor memory are read."""
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
        if look and not fact.zombie:
            shared = set((proctree.channels_of(proc.pid) or {}).values()) & channels
            if not unix_read and any(link.startswith("socket:") for link in shared):
                unix, unix_read = proctree.unix_sockets(), True
            # A TCP socket shared is one both inherited (a database connection), no channel.
            connected = any(
                link.startswith("pipe:") or unix is None or link in unix for link in shared
            )
            memory = proctree.rss_of([proc.pid])
            fact = replace(fact, connected=connected, memory=memory)
        facts.append(fact)
    if room is not None and look and sum(f.memory for f in facts) > room:
        facts = [replace(f, memory=proctree.pss_of([f.pid])) if f.memory else f for f in facts]
    return facts
