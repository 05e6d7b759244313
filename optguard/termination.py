"""``optguard run --terminate``: Optuna's ``optuna.terminator.Terminator``, evaluated by the
supervisor for the whole study, and a stop on every host when it says the study is done.

Optuna's ``TerminatorCallback`` calls ``study.stop()``, which stops only the process it runs
in; here the supervisor evaluates ``Terminator().should_terminate`` on a snapshot of the
study and sets the study-wide stop request, as ``optguard stop`` does. Each evaluation fits a
Gaussian process (the first one also imports torch: seconds), so it runs in a thread, at most
every ``TERMINATE_EVERY_S`` and only once new trials completed; the loop keeps enforcing the
limits meanwhile. Whether one is due is decided from the count of complete trials the
supervisor's progress already holds: the trials themselves (seconds to read at thousands of
trials) are read only for an evaluation that starts. The decisions (``terminate_due``,
``terminate_verdict``, ``terminate_error``) are pure; ``TerminatorWatch`` holds the thread.

Optuna warns at every evaluation (``Terminator`` is deprecated since 4.9, its evaluators are
experimental). ``quiet_terminator_warnings`` ignores those warnings once, from the thread that
makes the ``TerminatorWatch``, before any evaluation: ``warnings.catch_warnings`` in the
evaluation's thread would swap the process-wide filters under the other threads.

Optuna's default ``Terminator`` compares a regret bound with the statistical error of the
best trial's cross-validation scores, which the objective reports with
``optuna.terminator.report_cross_validation_scores(trial, scores)``; without them it cannot
decide, and the run goes on (one notice says why).
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

__all__ = [
    "TERMINATED_ATTR", "TERMINATE_EVERY_S", "TERMINATE_MIN_TRIALS", "TERMINATE_PACKAGES",
    "TerminatorWatch", "Verdict", "quiet_terminator_warnings", "terminate_due",
    "terminate_error", "terminate_verdict",
]  # fmt: skip

TERMINATED_ATTR = "optguard.terminated"  # on the study: why --terminate ended it
TERMINATE_EVERY_S = 5.0  # at most one evaluation (a GP fit) this often
TERMINATE_MIN_TRIALS = 20  # Optuna's DEFAULT_MIN_N_TRIALS: below it, should_terminate is False
TERMINATE_PACKAGES = ("torch", "scipy")  # RegretBoundEvaluator's GP (optuna._gp)
# What may go wrong in an evaluation that is no bug and may pass with more trials: ValueError
# (no cross-validation scores reported, no complete trial, an empty search space), ImportError
# (torch or scipy missing), RuntimeError and ArithmeticError (the GP fit on degenerate data:
# torch's LinAlgError is a RuntimeError). Anything else disables --terminate for the run.
RETRYABLE = (ValueError, ImportError, RuntimeError, ArithmeticError)


def terminate_error(terminate: bool | None, n_objectives: int) -> str | None:
    """Why ``--terminate`` cannot apply, or ``None``: Optuna's Terminator is defined for one
    objective (``study.direction`` raises for several)."""
    if not terminate or n_objectives <= 1:
        return None
    return (
        f"--terminate needs a single-objective study: this one has {n_objectives} objectives "
        "(Optuna's terminator is single-objective)"
    )


def terminate_due(
    since_s: float,
    busy: bool,
    complete: int,
    evaluated_complete: int,
    every_s: float = TERMINATE_EVERY_S,
    min_trials: int = TERMINATE_MIN_TRIALS,
) -> bool:
    """Whether to read the study's complete trials and evaluate them now, ``since_s`` after
    they were last read. ``complete``: the count the supervisor already has (its progress),
    no read; ``evaluated_complete``: how many the last evaluation had. Due when no evaluation
    runs, ``every_s`` passed, there are enough trials for Optuna to decide, and some completed
    since the last evaluation."""
    return (
        not busy
        and since_s >= every_s
        and complete >= min_trials
        and complete > evaluated_complete
    )


@dataclass(frozen=True)
class Verdict:
    """What one evaluation means: ``reason`` to end the study, or ``notice`` to tell (once
    per distinct text), or neither: go on. ``disable``: evaluate no more in this run."""

    reason: str | None = None
    notice: str | None = None
    disable: bool = False


def terminate_verdict(result: bool | BaseException, complete: int) -> Verdict:
    """The meaning of ``should_terminate``'s answer, or of what it raised, after ``complete``
    complete trials."""
    if result is True:
        return Verdict(
            reason=f"terminator: the room left for improvement (regret bound) is below the "
            f"statistical error after {complete} complete trials"
        )
    if result is False:
        return Verdict()
    what = f"{type(result).__name__}: {result}"
    if isinstance(result, RETRYABLE):
        return Verdict(notice=f"--terminate cannot decide yet ({what}); the run goes on")
    return Verdict(notice=f"--terminate disabled for this run: the terminator raised {what}",
                   disable=True)  # fmt: skip


# Where Optuna's terminator warnings come from: its own modules (Python < 3.12), or the first
# frame outside Optuna (3.12+: optuna_warn's skip_file_prefixes), should_terminate here.
TERMINATOR_MODULES = r"(optuna\.terminator(\..*)?|optguard\.termination)$"


def quiet_terminator_warnings() -> None:
    """Ignore the FutureWarning (deprecated since Optuna 4.9, to go in 6.0) and the
    ExperimentalWarning the terminator raises at each evaluation: asked for by name. Call it
    from the supervisor's main thread before the first evaluation; adding the same filter
    again moves it to the front, nothing more."""
    from optuna.exceptions import ExperimentalWarning

    for category in (FutureWarning, ExperimentalWarning):
        warnings.filterwarnings("ignore", category=category, module=TERMINATOR_MODULES)


def should_terminate(trials: Sequence["FrozenTrial"], direction: str) -> bool:
    """Optuna's ``Terminator().should_terminate`` on an in-memory copy of the study's complete
    trials (the evaluators read trials only; the real storage is never touched here). Run in
    a thread: it leaves the warnings filters alone (``quiet_terminator_warnings``)."""
    import optuna
    from optuna.terminator import Terminator

    study = optuna.create_study(direction=direction)
    study.add_trials(trials)
    return bool(Terminator().should_terminate(study))  # a NumPy bool otherwise


class TerminatorWatch:
    """The supervisor's side: one evaluation at a time, in a daemon thread. Made in the
    supervisor's main thread, which it quiets the terminator's warnings for."""

    def __init__(self, direction: str) -> None:
        quiet_terminator_warnings()  # here, before any evaluation's thread exists
        self.direction = direction
        self.read_at = -math.inf  # when the complete trials were last read
        self.evaluated_complete = 0
        self.disabled = False
        self.told: set[str] = set()
        self._thread: threading.Thread | None = None
        self._result: Any = None
        self._complete = 0

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def due(self, now: float, complete: int) -> bool:
        """Whether an evaluation is due, with ``complete`` trials counted by the progress."""
        return not self.disabled and terminate_due(
            now - self.read_at, self.busy, complete, self.evaluated_complete
        )

    def offer(
        self, now: float, complete: int, load: Callable[[], Sequence["FrozenTrial"]]
    ) -> bool:
        """Start an evaluation if one is due with ``complete`` trials counted; ``load`` reads
        the study's complete trials, called only then (at most once per ``every_s``)."""
        if not self.due(now, complete):
            return False
        self.read_at = now
        trials = list(load())
        self.evaluated_complete = len(trials)
        if len(trials) < TERMINATE_MIN_TRIALS:  # the count ran ahead of the storage
            return False
        self._complete = len(trials)
        self._result = None
        self._thread = threading.Thread(
            target=self._evaluate, args=(trials,), name="optguard-terminator", daemon=True
        )
        self._thread.start()
        return True

    def _evaluate(self, trials: list["FrozenTrial"]) -> None:
        try:
            self._result = should_terminate(trials, self.direction)
        except Exception as exc:  # judged by terminate_verdict in the loop's thread
            self._result = exc

    def collect(self) -> Verdict | None:
        """The verdict of the evaluation that just ended, once; ``None`` while none did.
        A notice already given is not repeated."""
        if self._thread is None or self._thread.is_alive():
            return None
        self._thread = None
        verdict = terminate_verdict(self._result, self._complete)
        self.disabled = self.disabled or verdict.disable
        if verdict.notice is not None:
            if verdict.notice in self.told:
                return Verdict(reason=verdict.reason, disable=verdict.disable)
            self.told.add(verdict.notice)
        return verdict
