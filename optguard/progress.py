"""How far a study is, read from its storage alone with a few aggregate queries.

Cheap enough to poll every second: counts are ``GROUP BY`` queries, not a load of every trial.
A multi-objective study has no best value: its progress shows how many trials are on the
Pareto front instead (read from the complete trials' values, without loading the trials).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from optguard.outage import outage_of
from optguard.sqlite import reading
from optguard.storage import is_rdb

if TYPE_CHECKING:
    import optuna

__all__ = [
    "Progress", "read_progress", "count_trials", "pareto_front_size", "feasible",
    "feasible_trial",
]  # fmt: skip

FINISHED = ("COMPLETE", "PRUNED", "FAIL")
REASON = "optguard.reason"
CONSTRAINTS_KEY = "constraints"  # Optuna's system attribute: "constraints" (a list, old) or
# "constraints:<name>" (trial.set_constraint, Optuna 5); feasible when every value is <= 0


@dataclass(frozen=True)
class Progress:
    states: dict[str, int] = field(default_factory=dict)
    best_value: float | None = None
    prune_reasons: dict[str, int] = field(default_factory=dict)
    n_objectives: int = 1
    pareto_front: int | None = None  # multi-objective: trials on the (feasible) Pareto front

    @property
    def finished(self) -> int:
        return sum(self.states.get(s, 0) for s in FINISHED)

    @property
    def running(self) -> int:
        return self.states.get("RUNNING", 0)

    def best_text(self) -> str:
        """``best 0.123`` or, with several objectives, ``pareto front 4``."""
        if self.n_objectives > 1:
            return f"pareto front {self.pareto_front or 0}"
        return "best " + ("-" if self.best_value is None else f"{self.best_value:.6g}")

    def describe(self, n_trials: int | None) -> str:
        total = "?" if n_trials is None else str(n_trials)
        if self.n_objectives > 1:
            best = f"pareto_front={self.pareto_front or 0}"
        else:
            best = "best=" + ("-" if self.best_value is None else f"{self.best_value:.6g}")
        reasons = " ".join(f"{k}={v}" for k, v in sorted(self.prune_reasons.items())) or "none"
        return (
            f"{self.finished}/{total} finished, {self.running} running, "
            f"complete={self.states.get('COMPLETE', 0)} pruned={self.states.get('PRUNED', 0)} "
            f"failed={self.states.get('FAIL', 0)}, {best}, ended by optguard: {reasons}"
        )


def feasible(constraints: Sequence[Any]) -> bool:
    """A trial is feasible when every constraint value is <= 0 (Optuna's rule)."""
    return all(float(c) <= 0 for c in constraints)


def pareto_front_size(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> int:
    """How many points no other point dominates (at least as good in every objective, better
    in one); equal points are all on the front, as in ``study.best_trials``, whose own NumPy
    routine this is: the supervisor counts it every few seconds, for fronts of thousands."""
    if not points:
        return 0
    import numpy as np
    from optuna.study._multi_objective import _is_pareto_front

    signs = np.array([-1.0 if m else 1.0 for m in maximize])
    losses = np.asarray(points, dtype=float) * signs
    return int(_is_pareto_front(losses, assume_unique_lexsorted=False).sum())


def state_counts(study_id: int) -> Any:
    """The statement counting the study's trials by state (one ``GROUP BY``)."""
    from optuna.storages._rdb import models
    from sqlalchemy import func, select

    trial = models.TrialModel
    return (
        select(trial.state, func.count()).where(trial.study_id == study_id).group_by(trial.state)
    )


def count_trials(storage: "optuna.storages.RDBStorage", study_id: int) -> int:
    """Trials of the study in any state, running and waiting included (one count query)."""

    if not is_rdb(storage):
        return len(storage.get_all_trials(study_id, deepcopy=False))

    def read() -> int:
        with reading(), storage.engine.connect() as conn:
            return sum(int(n) for _, n in conn.execute(state_counts(study_id)))

    return int(outage_of(storage).call(read))


def read_progress(storage: "optuna.storages.RDBStorage", study_id: int) -> Progress:
    """States, guard-prune reasons and the best value (or Pareto front size), in one
    connection.

    The best value is a ``MIN``/``MAX`` over complete trials' first objective rather than
    ``get_best_trial``, which loads the trial and cost 20 ms a call on a busy SQLite file;
    infinite values (stored as NULL) are left out of it. With several objectives the complete
    trials' values and constraints are read (two queries) and the front counted here, over
    feasible trials as ``study.best_trials`` does. Retried through an outage like the
    storage's own calls (``optguard.outage``).
    """
    if not is_rdb(storage):
        return _progress_of_trials(storage, study_id)
    from optuna.storages._rdb import models
    from optuna.study import StudyDirection
    from optuna.trial import TrialState
    from sqlalchemy import func, select

    trial = models.TrialModel
    attr = models.TrialUserAttributeModel
    value = models.TrialValueModel
    system = models.TrialSystemAttributeModel
    by_state = state_counts(study_id)
    by_reason = (
        select(attr.value_json, func.count())
        .join(trial, attr.trial_id == trial.trial_id)
        .where(trial.study_id == study_id, attr.key == REASON)
        .group_by(attr.value_json)
    )
    directions = storage.get_study_directions(study_id)
    maximize = [d == StudyDirection.MAXIMIZE for d in directions]
    complete = (trial.study_id == study_id, trial.state == TrialState.COMPLETE)
    best_of = (func.max if maximize[0] else func.min)(value.value)
    best = (
        select(best_of)
        .join(trial, value.trial_id == trial.trial_id)
        .where(*complete, value.objective == 0)
    )
    all_values = (
        select(value.trial_id, value.objective, value.value, value.value_type)
        .join(trial, value.trial_id == trial.trial_id)
        .where(*complete)
    )
    constraints = (
        select(system.trial_id, system.key, system.value_json)
        .join(trial, system.trial_id == trial.trial_id)
        .where(*complete, system.key.like(CONSTRAINTS_KEY + "%"))
    )

    def read() -> tuple[dict[str, int], dict[str, int], Any, list[Any], list[Any]]:
        with reading(), storage.engine.connect() as conn:
            states = {state.name: int(n) for state, n in conn.execute(by_state)}
            reasons = {str(json.loads(v)): int(n) for v, n in conn.execute(by_reason)}
            best_value, rows, bounds = None, [], []
            if states.get("COMPLETE"):
                bounds = conn.execute(constraints).all()
                if len(directions) > 1:
                    rows = conn.execute(all_values).all()
                else:  # as study.best_trial: over feasible trials only
                    excluded = _infeasible(bounds)
                    best_value = conn.execute(
                        best.where(value.trial_id.not_in(excluded)) if excluded else best
                    ).scalar()
        return states, reasons, best_value, rows, bounds

    states, reasons, best_value, rows, bounds = outage_of(storage).call(read)
    # counted with the connection given back: a big front takes CPU, not the database
    front = _front_of(rows, bounds, maximize) if rows else None
    return Progress(
        states=states,
        best_value=None if best_value is None else float(best_value),
        prune_reasons=reasons,
        n_objectives=len(directions),
        pareto_front=front,
    )


def _infeasible(bounds: Sequence[Any]) -> set[int]:
    """Trial ids with a violated constraint, from rows ``(trial_id, key, value_json)``."""
    found = set()
    for trial_id, _key, value_json in bounds:
        loaded = json.loads(value_json)
        values = loaded if isinstance(loaded, list) else [loaded]
        if loaded is not None and not feasible(values):
            found.add(trial_id)
    return found


def _front_of(rows: Sequence[Any], bounds: Sequence[Any], maximize: Sequence[bool]) -> int:
    """The Pareto front size from value rows ``(trial_id, objective, value, value_type)`` and
    constraint rows ``(trial_id, key, value_json)``."""
    from optuna.storages._rdb.models import TrialValueModel

    points: dict[int, dict[int, float]] = {}
    for trial_id, objective, stored, kind in rows:
        points.setdefault(trial_id, {})[objective] = TrialValueModel.stored_repr_to_value(
            stored, kind
        )
    infeasible = _infeasible(bounds)
    n = len(maximize)
    return pareto_front_size(
        [
            [p[i] for i in range(n)]
            for trial_id, p in points.items()
            if trial_id not in infeasible and len(p) == n
        ],
        maximize,
    )


def _progress_of_trials(storage: "optuna.storages.BaseStorage", study_id: int) -> Progress:
    """``read_progress`` for a storage without SQL (Optuna's journal file, which holds the
    trials in memory and reads only what was appended since): the same figures, from the
    trials themselves."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    trials = storage.get_all_trials(study_id, deepcopy=False)
    directions = storage.get_study_directions(study_id)
    maximize = [d == StudyDirection.MAXIMIZE for d in directions]
    complete = [
        t for t in trials
        if t.state == TrialState.COMPLETE and t.values is not None and feasible_trial(t)
    ]  # fmt: skip
    best_value = front = None
    if len(directions) == 1:
        finite = [t.values[0] for t in complete if math.isfinite(t.values[0])]
        best_value = (max if maximize[0] else min)(finite) if finite else None
    elif complete:
        front = pareto_front_size([t.values for t in complete], maximize)
    return Progress(
        states=dict(Counter(t.state.name for t in trials)),
        best_value=best_value,
        prune_reasons=dict(
            Counter(str(t.user_attrs[REASON]) for t in trials if REASON in t.user_attrs)
        ),
        n_objectives=len(directions),
        pareto_front=front,
    )


def feasible_trial(trial: "optuna.trial.FrozenTrial") -> bool:
    """No constraint of the trial is violated (none set: feasible), as Optuna judges it for
    ``best_trial``/``best_trials``."""
    return feasible(trial.constraints.values())
