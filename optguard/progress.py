"""How far a study is, read from its storage alone with a few aggregate queries.

Cheap enough to poll every second: counts are ``GROUP BY`` queries, not a load of every trial.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optguard.outage import outage_of

if TYPE_CHECKING:
    import optuna

__all__ = ["Progress", "read_progress"]

FINISHED = ("COMPLETE", "PRUNED", "FAIL")


@dataclass(frozen=True)
class Progress:
    states: dict[str, int] = field(default_factory=dict)
    best_value: float | None = None
    prune_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def finished(self) -> int:
        return sum(self.states.get(s, 0) for s in FINISHED)

    @property
    def running(self) -> int:
        return self.states.get("RUNNING", 0)

    def describe(self, n_trials: int | None) -> str:
        total = "?" if n_trials is None else str(n_trials)
        best = "-" if self.best_value is None else f"{self.best_value:.6g}"
        reasons = " ".join(f"{k}={v}" for k, v in sorted(self.prune_reasons.items())) or "none"
        return (
            f"{self.finished}/{total} finished, {self.running} running, "
            f"complete={self.states.get('COMPLETE', 0)} pruned={self.states.get('PRUNED', 0)} "
            f"failed={self.states.get('FAIL', 0)}, best={best}, ended by optguard: {reasons}"
        )


def read_progress(storage: "optuna.storages.RDBStorage", study_id: int) -> Progress:
    """States, guard-prune reasons and the best value, in one connection.

    The best value is a ``MIN``/``MAX`` over complete trials' first objective rather than
    ``get_best_trial``, which loads the trial and cost 20 ms a call on a busy SQLite file;
    infinite values (stored as NULL) are left out of it. Retried through an outage like the
    storage's own calls (``optguard.outage``).
    """
    from optuna.storages._rdb import models
    from optuna.study import StudyDirection
    from optuna.trial import TrialState
    from sqlalchemy import func, select

    trial = models.TrialModel
    attr = models.TrialUserAttributeModel
    value = models.TrialValueModel
    by_state = (
        select(trial.state, func.count())
        .where(trial.study_id == study_id)
        .group_by(trial.state)
    )
    by_reason = (
        select(attr.value_json, func.count())
        .join(trial, attr.trial_id == trial.trial_id)
        .where(trial.study_id == study_id, attr.key == "optguard.reason")
        .group_by(attr.value_json)
    )
    maximize = storage.get_study_directions(study_id)[0] == StudyDirection.MAXIMIZE
    best_of = (func.max if maximize else func.min)(value.value)
    best = (
        select(best_of)
        .join(trial, value.trial_id == trial.trial_id)
        .where(
            trial.study_id == study_id,
            trial.state == TrialState.COMPLETE,
            value.objective == 0,
        )
    )

    def read() -> tuple[dict[str, int], dict[str, int], Any]:
        with storage.engine.connect() as conn:
            states = {state.name: int(n) for state, n in conn.execute(by_state)}
            reasons = {str(json.loads(v)): int(n) for v, n in conn.execute(by_reason)}
            best_value = conn.execute(best).scalar() if states.get("COMPLETE") else None
        return states, reasons, best_value

    states, reasons, best_value = outage_of(storage).call(read)
    return Progress(
        states=states,
        best_value=None if best_value is None else float(best_value),
        prune_reasons=reasons,
    )
