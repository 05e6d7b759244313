"""Whether the owner of a RUNNING trial is alive: the one place that decides it.

A RUNNING trial names its owner, ``host:pid``, from the transaction that created it
(``optguard.ownership``). On the owner's host the process itself answers: gone, a zombie, or
a pid reused by a process started after the trial all mean the owner is dead. On another
host only the heartbeat can answer, and a trial that has never beaten cannot answer yet: its
reaper records a first beat for it (the database's clock, so no host's clock is trusted), and
the trial goes stale like any other if its owner never beats again.

``trial_verdict`` is pure and table-tested; ``probe`` reads ``/proc``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

__all__ = ["Beat", "Owner", "Proc", "Verdict", "parse_owner", "probe", "probe_trial",
           "trial_verdict"]


class Verdict(enum.Enum):
    ALIVE = "alive"
    DEAD = "dead"
    UNKNOWN = "unknown"  # cannot tell yet: leave the trial alone
    UNBEATEN = "unbeaten"  # another host's trial with no heartbeat: give it a first beat


class Proc(enum.Enum):
    """What ``/proc`` says of the owner's pid on its own host."""

    RUNNING = "running"
    ZOMBIE = "zombie"  # dead; its parent has not reaped it (or never will, as a bad PID 1)
    GONE = "gone"
    REUSED = "reused"  # the pid now names a process started after the trial
    UNREADABLE = "unreadable"  # permissions: cannot tell


class Beat(enum.Enum):
    """The trial's heartbeat as the database's stale query sees it."""

    FRESH = "fresh"
    STALE = "stale"
    NEVER = "never"


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int


def parse_owner(tag: object) -> Owner | None:
    """``optguard.worker`` (``host:pid``) as an ``Owner``; None when absent or malformed."""
    if not isinstance(tag, str):
        return None
    host, _, pid = tag.rpartition(":")
    return Owner(host, int(pid)) if host and pid.isdigit() else None


def probe(pid: int, started_at: float) -> Proc:
    """The state of ``pid`` on this host, for a trial started at ``started_at`` (epoch s)."""
    try:
        proc = psutil.Process(pid)
        if proc.create_time() > started_at + 1.0:  # 1 s: create_time's jiffy rounding
            return Proc.REUSED
        return Proc.ZOMBIE if proc.status() == psutil.STATUS_ZOMBIE else Proc.RUNNING
    except psutil.NoSuchProcess:
        return Proc.GONE
    except psutil.Error:
        return Proc.UNREADABLE


def probe_trial(owner: Owner, trial: "FrozenTrial") -> Proc:
    """``probe`` of a trial's owner on this host, against the trial's start: a pid started
    after the trial is a reused one."""
    started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    return probe(owner.pid, started)


def trial_verdict(
    owner: Owner | None, this_host: str, proc: Proc | None, beat: Beat, supervised: bool
) -> Verdict:
    """Whether a RUNNING trial's owner is alive.

    ``proc`` is ``probe``'s answer when the owner is on this host (None otherwise); ``beat``
    the heartbeat's state; ``supervised``: the trial says a supervisor beats for it
    (``optguard.beats``). On its own host the process decides, whatever the beats say (a
    worker stuck in C is alive; a zombie that beat a second ago is dead). Elsewhere, and for
    a trial without a readable owner (written by plain Optuna), only the heartbeat decides,
    and a trial that never beat is given a first beat only when a supervisor would beat for
    it: a worker started by hand, or plain ``study.optimize``, never beats, and is alive.
    """
    if owner is not None and owner.host == this_host and proc is not None:
        if proc in (Proc.GONE, Proc.ZOMBIE, Proc.REUSED):
            return Verdict.DEAD
        return Verdict.ALIVE if proc is Proc.RUNNING else Verdict.UNKNOWN
    if beat is Beat.STALE:
        return Verdict.DEAD
    if beat is Beat.NEVER:
        return Verdict.UNBEATEN if supervised else Verdict.ALIVE
    return Verdict.ALIVE
