"""Early stopping: of epochs inside a trial (``EarlyStopping``), and of a whole study
(``study_plateaued``, behind ``optguard run --patience N --min-delta D``)."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

__all__ = ["EarlyStopping", "study_plateaued", "patience_error"]

# A child of the worker's logger: inside an optguard worker its line lands in the worker log.
_log = logging.getLogger("optguard.worker.early_stopping")


class EarlyStopping:
    """Stop an epoch loop once ``patience`` updates in a row have not improved on the best
    value by more than ``threshold``.

    >>> stopper = EarlyStopping(patience=2)
    >>> [stopper.update(v) for v in (1.0, 0.5, 0.6, 0.55)]
    [False, False, False, True]
    >>> stopper.best, stopper.best_step
    (0.5, 1)
    """

    def __init__(
        self, patience: int = 3, threshold: float = 0.0, greater_is_better: bool = False
    ) -> None:
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.patience = patience
        self.threshold = threshold
        self.greater_is_better = greater_is_better
        self.best: float | None = None
        self.best_step: int | None = None
        self.step = -1
        self.stopped = False

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        gain = value - self.best if self.greater_is_better else self.best - value
        return gain > self.threshold

    def update(self, value: float) -> bool:
        """Record the next value; ``True`` means stop now."""
        self.step += 1
        value = float(value)
        if not math.isnan(value) and self._improves(value):
            self.best, self.best_step = value, self.step
        elif self.step - (-1 if self.best_step is None else self.best_step) >= self.patience:
            if not self.stopped:
                _log.info(
                    "Early stopping at step %d: no improvement over %s (step %s) for %d steps",
                    self.step, self.best, self.best_step, self.patience,
                )  # fmt: skip
            self.stopped = True
        return self.stopped


def patience_error(patience: int | None, n_objectives: int) -> str | None:
    """Why ``--patience`` cannot apply, or ``None``: a plateau is defined on one best value,
    and a multi-objective study has a Pareto front instead (whose growth or shift is no
    agreed plateau), so it is refused rather than guessed."""
    if patience is None or n_objectives <= 1:
        return None
    return (
        f"--patience needs a single-objective study: this one has {n_objectives} objectives "
        "(a Pareto front, not a best value that can plateau)"
    )


def study_plateaued(
    finished: Sequence["FrozenTrial"], patience: int, min_delta: float, maximize: bool
) -> str | None:
    """Why the study should end, or ``None``: the best value did not improve by more than
    ``min_delta`` over the last ``patience`` finished trials (in the order they finished)."""
    if len(finished) <= patience:
        return None
    ordered = sorted(finished, key=lambda t: (t.datetime_complete is None, t.datetime_complete))
    pick = max if maximize else min

    def best(trials: Sequence["FrozenTrial"]) -> float | None:
        # as study.best_trial: an infeasible trial (a constraint > 0) is never the best
        values = [
            t.value for t in trials
            if t.value is not None and all(c <= 0 for c in t.constraints.values())
        ]  # fmt: skip
        return pick(values) if values else None

    before, recent = best(ordered[:-patience]), best(ordered[-patience:])
    if before is None:
        return None  # nothing to improve on yet
    gain = None if recent is None else (recent - before if maximize else before - recent)
    if gain is not None and gain > min_delta:
        return None
    return (
        f"early stopping: best value {before:.6g} did not improve by more than {min_delta:g} "
        f"over the last {patience} finished trials"
    )
