"""What to do about a running trial, from what was measured: pure, table-tested decisions.

Escalation for a trial past a limit (each step logged in the worker's log by the caller):
soft (the worker's next check prunes) -> interrupt (``GuardPruned`` raised in the worker's
main thread) -> kill (the tree is ended; the trial marked PRUNED by the supervisor).

A worker that acknowledges the interrupt is running Python and gets ``--kill-after`` to end
its trial (counted from the end of its emergency checkpoints). One that has not acknowledged
after ``--kill-after`` is stuck in C, where no signal handler runs: it is killed without
a SIGTERM it could not act on. A large allocation or a long C call that returns within
``--kill-after`` is not stuck: its worker acknowledges, prunes and lives on. Above the
memory ceiling the tree is killed at once, checkpoints or not.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from optguard.guard import REASON_GPU_MEMORY, REASON_MEMORY, REASON_TIMEOUT, Violation
from optguard.limits import Escalation, Limits
from optguard.timeline import Timeline

__all__ = ["REASON_CANCELLED", "STOP_GRACE_S", "Step", "Watched", "decide", "decide_cancel"]

REASON_CANCELLED = "cancelled"
STOP_GRACE_S = 10.0  # cancel: from "prune at the next check" to the interrupt


class Step(enum.Enum):
    SOFT = "soft"  # prune at the next check
    INTERRUPT = "interrupt"  # raise GuardPruned in the worker's main thread now
    KILL = "kill"  # SIGTERM to the tree, SIGKILL --kill-after later
    KILL_STUCK = "kill_stuck"  # no answer to the interrupt: SIGKILL the worker now
    KILL_NOW = "kill_now"  # above the memory ceiling: SIGKILL the whole tree now


@dataclass
class Watched:
    """A running trial as the supervisor watches it (the caller updates it after each step)."""

    number: int
    trial_id: int
    started: float  # the worker's time.monotonic() at the start: one clock per host
    peak: int = 0
    peak_sent: int = 0
    vram_peak: int = 0  # GPU memory of the tree (NVML), with --max-vram
    violation: Violation | None = None
    violation_at: float = 0.0
    interrupted_at: float | None = None
    acked: bool = False  # the worker said it acted on the interrupt
    timeline: Timeline = field(default_factory=Timeline)  # with --artifacts: evidence
    spooled_at: float = 0.0


def _kill_due(
    t: Watched, now: float, esc: Escalation, checkpoint_until: float
) -> tuple[Step, Violation] | None:
    if t.violation is None or t.interrupted_at is None or now < checkpoint_until:
        return None  # nothing sent yet, or emergency checkpoints hold every kill
    if not t.acked:
        return (Step.KILL_STUCK, t.violation) if now - t.interrupted_at > esc.kill_after_s else None
    if now - max(t.interrupted_at, checkpoint_until) > esc.kill_after_s:
        return Step.KILL, t.violation
    return None


def decide(
    t: Watched,
    memory: int,
    elapsed: float,
    now: float,
    limits: Limits,
    esc: Escalation,
    checkpoint_until: float = 0.0,
    vram: int = 0,
) -> tuple[Step, Violation] | None:
    """The next step for trial ``t`` whose tree uses ``memory`` bytes of RAM and ``vram`` of
    GPU memory after ``elapsed`` s. GPU memory is escalated as RAM is (``--memory-grace``,
    ``--memory-ceiling``), against ``limits.max_vram_bytes``."""
    for reason, used, limit in (
        (REASON_MEMORY, memory, limits.max_rss_bytes),
        (REASON_GPU_MEMORY, vram, limits.max_vram_bytes),
    ):
        if limit is None or used <= limit:
            continue
        violation = Violation(t.number, reason, elapsed, used, float(limit))
        if used > limit * esc.memory_ceiling:
            return Step.KILL_NOW, violation
        if t.violation is None:
            return (Step.INTERRUPT if esc.memory_grace_s <= 0 else Step.SOFT), violation
        if t.interrupted_at is None and now - t.violation_at > esc.memory_grace_s:
            return Step.INTERRUPT, violation
    timeout = limits.timeout_s
    if timeout is not None and t.interrupted_at is None and elapsed > timeout + esc.grace_s:
        return Step.INTERRUPT, Violation(t.number, REASON_TIMEOUT, elapsed, memory, timeout)
    due = _kill_due(t, now, esc, checkpoint_until)
    if due is not None:
        return due[0], Violation(
            due[1].trial_number, due[1].reason, elapsed, due[1].rss_bytes, due[1].limit
        )
    return None


def decide_cancel(
    t: Watched, memory: int, elapsed: float, now: float, esc: Escalation,
    checkpoint_until: float = 0.0,
) -> tuple[Step, Violation] | None:  # fmt: skip
    """A cancelled trial: pruned at its next check, interrupted ``STOP_GRACE_S`` later, then
    killed like any other."""
    if t.violation is None or t.violation.reason != REASON_CANCELLED:
        return Step.SOFT, Violation(t.number, REASON_CANCELLED, elapsed, memory, 0.0)
    if t.interrupted_at is None:
        return (Step.INTERRUPT, t.violation) if now - t.violation_at > STOP_GRACE_S else None
    return _kill_due(t, now, esc, checkpoint_until)
