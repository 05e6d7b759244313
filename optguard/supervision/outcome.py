"""How a run ended, and its exit code: pure decisions, table-tested.

Exit 0 means the study has its trials (or was ended on purpose: ``--patience``, or
``trial.study.stop()`` in the objective). Everything else is a documented non-zero code with
one line saying why (see ``optguard.errors``).
"""

from __future__ import annotations

from dataclasses import dataclass

from optguard.errors import OptguardError, StudyFailedError, StudyIncompleteError
from optguard.progress import Progress

__all__ = ["Ended", "fail_fast_error", "incomplete_error"]


@dataclass(frozen=True)
class Ended:
    """One trial this run finished, as its worker reported it."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL
    error: str | None = None
    enforcement: str | None = None  # check, interrupt, hard_kill, oom: the step that ended it

    @property
    def failed(self) -> bool:
        """A failure for ``--fail-fast``: FAIL, or PRUNED because the objective ran out of
        memory (recorded as the guard's own, but a study whose every trial does is broken)."""
        return self.state == "FAIL" or self.enforcement == "oom"


def fail_fast_error(first: list[Ended], n: int, log_hint: str) -> OptguardError | None:
    """``StudyFailedError`` once the run's first ``n`` trials all failed with one error.

    ``study.optimize`` stops at an objective's first exception; a study whose every trial
    fails for the same reason (a bug, a missing package) must not run to its end and exit 0.
    Failures with different errors, or any trial that did not fail, keep the run going.
    """
    if n <= 0 or len(first) < n:
        return None
    errors = {e.error for e in first[:n] if e.failed}
    if len(errors) != 1 or sum(e.failed for e in first[:n]) < n:
        return None
    (error,) = errors
    return StudyFailedError(
        f"the first {n} trials all failed with: {error or 'an error'} ({log_hint}; "
        f"--fail-fast 0 tolerates failures)"
    )


def incomplete_error(progress: Progress, n_trials: int | None) -> OptguardError | None:
    """``StudyIncompleteError`` when the run ends without the study having its trials."""
    waiting = progress.states.get("WAITING", 0)
    missing = 0 if n_trials is None else n_trials - progress.finished
    if missing <= 0 and not waiting and not progress.running:
        return None
    parts = []
    if missing > 0:
        parts.append(f"{progress.finished}/{n_trials} trials finished")
    if progress.running:
        parts.append(f"{progress.running} RUNNING")
    if waiting:
        parts.append(f"{waiting} WAITING")
    return StudyIncompleteError(
        "the run ended without the study having its trials: " + ", ".join(parts)
    )
