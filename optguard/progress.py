"""How far a study is, read from its storage alone with a few aggregate queries.

Cheap enough to poll every second: counts are ``GROUP BY`` queries, not a load of every trial.
A multi-objective study has no best value: its progress shows how many trials are on the
Pareto front instead (read from the complete trials' values, without loading the trials).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from optguard.outage import outage_of
from optguard.sqlite import reading
from optguard.storage import is_rdb

if TYPE_CHECKING:
    import optuna

__all__ = [
    "Progress", "ProgressReader", "read_progress", "count_trials", "pareto_front_size",
    "feasible", "feasible_trial",
]  # fmt: skip

FINISHED = ("COMPLETE", "PRUNED", "FAIL")
IN_CHUNK = 500  # ids per ``IN (...)`` list: well under SQLite's bound-parameter limit
COMMIT_GRACE_S = 10.0  # a trial id seen this long ago is taken as settled (ProgressReader)
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


class ProgressReader:
    """``read_progress`` for a loop that polls one study: the same ``Progress``, but each
    ``read()`` asks the database only about trials it has not yet seen finished.

    Why: ``read_progress`` aggregates over every trial of the study, so N supervisors polling
    a study of T trials scan N*T rows a second. A finished trial (COMPLETE, PRUNED, FAIL)
    never changes again (Optuna refuses to update it, and its values, constraints and
    optguard's reason are written before or with its final state), so its state, reason,
    value and feasibility are folded into running totals once; each read then fetches only
    the study's trials above a settled id (new ones) plus those it last saw RUNNING or
    WAITING, by primary key: O(new + unfinished) rows, whatever the number of finished.

    Out-of-order ids: every writer that creates a trial (Optuna's ``_create_new_trial``,
    optguard's claim and ``_create_trial_once``) holds the study row ``FOR UPDATE`` from
    before the id is drawn until the commit, so one study's ids commit in id order, and
    SQLite has one writer. As a safety net for a writer that does not lock, ids seen in the
    last ``grace_s`` are read again (by primary-key range; rows already folded are skipped),
    so a lower id committed up to ``grace_s`` after a higher one is still counted. The first
    read of a reader is one pass over the study and counts as settled at once.

    Not thread-safe: one reader per polling loop. A journal file (no SQL) is read as
    ``read_progress`` reads it: Optuna's journal already reads only what was appended.
    """

    def __init__(
        self,
        storage: "optuna.storages.BaseStorage",
        study_id: int,
        grace_s: float = COMMIT_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.storage = storage
        self.study_id = study_id
        self.grace_s = grace_s
        self.clock = clock
        self.last_rows = 0  # rows the last read() fetched, all statements together
        self.last_statements = 0
        self._maximize: list[bool] | None = None
        self._tops: deque[tuple[float, int]] = deque()  # (read time, highest id seen)
        self._settled: int | None = None  # ids <= this were seen in a read grace_s ago
        self._top: int | None = None  # highest trial id of the study seen
        self._pending: set[int] = set()  # ids last seen RUNNING or WAITING
        self._folded: set[int] = set()  # finished ids above _settled (may be read again)
        self._states: Counter[str] = Counter()  # of finished trials
        self._reasons: Counter[str] = Counter()  # of finished trials
        self._best: float | None = None
        self._any_values = False  # a complete trial had values: the front is a number
        self._front: list[list[float]] = []  # feasible complete points on the Pareto front

    def read(self) -> Progress:
        if not is_rdb(self.storage):
            return _progress_of_trials(self.storage, self.study_id)
        if self._maximize is None:  # a study's directions never change
            from optuna.study import StudyDirection

            directions = self.storage.get_study_directions(self.study_id)
            self._maximize = [d == StudyDirection.MAXIMIZE for d in directions]
        now = self.clock()
        floor = self._floor(now)
        old = sorted(i for i in self._pending if floor is None or i <= floor)
        # the database work, retried whole through an outage: nothing is kept until it is done
        fetched = outage_of(self.storage).call(lambda: self._fetch(floor, old))
        return self._fold(now, floor, *fetched)

    def _floor(self, now: float) -> int | None:
        """The id above which trials are read again: the top of the newest read made at
        least ``grace_s`` ago (the first read's top at once); ``None`` before any read."""
        while self._tops and now - self._tops[0][0] >= self.grace_s:
            self._settled = self._tops.popleft()[1]
        if self._settled is not None:
            self._folded = {i for i in self._folded if i > self._settled}
        return self._settled

    def _fetch(
        self, floor: int | None, old: list[int]
    ) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        """Trial states first, then the reasons, values and constraints of only the trials
        that need them, on one connection: O(new + unfinished) rows, a few statements."""
        from optuna.storages._rdb import models
        from optuna.trial import TrialState
        from sqlalchemy import select

        trial = models.TrialModel
        attr = models.TrialUserAttributeModel
        value = models.TrialValueModel
        system = models.TrialSystemAttributeModel
        ours = trial.study_id == self.study_id
        n_objectives = len(self._maximize or ())
        rows_seen = statements = 0

        def run(conn: Any, stmt: Any, old_ids: list[int]) -> list[Any]:
            nonlocal rows_seen, statements
            found: list[Any] = []
            for where in _id_conditions(trial.trial_id, floor, old_ids):
                part = conn.execute(stmt.where(ours, where)).all()
                statements += 1
                rows_seen += len(part)
                found.extend(part)
            return found

        with reading(), self.storage.engine.connect() as conn:
            rows = run(conn, select(trial.trial_id, trial.state), old)
            # reasons of every trial not folded yet; values and constraints of complete ones
            need = {i for i, s in rows if i not in self._folded}
            complete = {i for i, s in rows if s == TrialState.COMPLETE and i not in self._folded}
            old_need = sorted(i for i in need if floor is not None and i <= floor)
            old_complete = sorted(i for i in complete if floor is not None and i <= floor)
            reasons = values = bounds = []
            if need:
                reasons = run(
                    conn,
                    select(attr.trial_id, attr.value_json)
                    .join(trial, attr.trial_id == trial.trial_id)
                    .where(attr.key == REASON),
                    old_need,
                )
            if complete:
                stmt = select(value.trial_id, value.objective, value.value, value.value_type)
                stmt = stmt.join(trial, value.trial_id == trial.trial_id)
                if n_objectives == 1:
                    stmt = stmt.where(value.objective == 0)
                values = run(conn, stmt, old_complete)
                bounds = run(
                    conn,
                    select(system.trial_id, system.key, system.value_json)
                    .join(trial, system.trial_id == trial.trial_id)
                    .where(system.key.like(CONSTRAINTS_KEY + "%")),
                    old_complete,
                )
        self.last_rows, self.last_statements = rows_seen, statements
        # rows of trials that appeared after the states were read are not ours to fold yet
        return (
            [(int(i), s.name) for i, s in rows],
            [r for r in reasons if r[0] in need],
            [r for r in values if r[0] in complete],
            [r for r in bounds if r[0] in complete],
        )

    def _fold(
        self,
        now: float,
        floor: int | None,
        rows: list[tuple[int, str]],
        reasons: list[Any],
        values: list[Any],
        bounds: list[Any],
    ) -> Progress:
        """Fold the trials seen finished into the totals; count the unfinished afresh."""
        from optuna.storages._rdb.models import TrialValueModel

        maximize = self._maximize or [False]
        reason_of = {int(i): str(json.loads(v)) for i, v in reasons}
        states: Counter[str] = Counter()
        open_reasons: Counter[str] = Counter()
        pending: set[int] = set()
        finished: set[int] = set()
        for trial_id, state in rows:
            if trial_id in self._folded:
                continue  # read again in the grace window: already counted
            if state in FINISHED:
                finished.add(trial_id)
                self._states[state] += 1
                if trial_id in reason_of:
                    self._reasons[reason_of[trial_id]] += 1
            else:
                pending.add(trial_id)
                states[state] += 1
                if trial_id in reason_of:
                    open_reasons[reason_of[trial_id]] += 1
        infeasible = _infeasible(bounds)
        points: dict[int, dict[int, float]] = {}
        for trial_id, objective, stored, kind in values:
            self._any_values = True
            points.setdefault(int(trial_id), {})[objective] = (
                stored if len(maximize) == 1 else TrialValueModel.stored_repr_to_value(stored, kind)
            )
        feasible_points = [p for i, p in points.items() if i not in infeasible]
        if len(maximize) == 1:
            # as MIN/MAX in SQL: infinite values are stored as NULL and left out
            finite = [float(p[0]) for p in feasible_points if p.get(0) is not None]
            if self._best is not None:
                finite.append(self._best)
            if finite:
                self._best = (max if maximize[0] else min)(finite)
        else:
            n = len(maximize)
            new = [[p[k] for k in range(n)] for p in feasible_points if len(p) == n]
            if new:
                self._front = _front_points(self._front + new, maximize)
        self._folded |= finished
        self._pending = pending
        if rows:
            self._top = max(self._top or 0, max(i for i, _ in rows))
        if floor is None:
            self._settled = self._top or 0  # the first read: one pass, settled at once
        elif self._top is not None:
            self._tops.append((now, self._top))
        all_states = self._states + states  # Counter addition drops zero counts
        return Progress(
            states=dict(all_states),
            best_value=self._best if all_states.get("COMPLETE") else None,
            prune_reasons=dict(self._reasons + open_reasons),
            n_objectives=len(maximize),
            pareto_front=(len(self._front) if self._any_values else None)
            if len(maximize) > 1
            else None,
        )


def _id_conditions(column: Any, floor: int | None, old: list[int]) -> Iterable[Any]:
    """``WHERE`` clauses that together pick the ids above ``floor`` and those in ``old``,
    each ``IN`` list at most ``IN_CHUNK`` long (all of the study when ``floor`` is None)."""
    from sqlalchemy import or_, true

    if floor is None:
        yield true()
        return
    chunks = [old[i : i + IN_CHUNK] for i in range(0, len(old), IN_CHUNK)]
    yield or_(column > floor, column.in_(chunks[0])) if chunks else column > floor
    for chunk in chunks[1:]:
        yield column.in_(chunk)


def _front_points(points: list[list[float]], maximize: Sequence[bool]) -> list[list[float]]:
    """The points of ``points`` on its Pareto front. The front of (front of A) + B is the
    front of A + B (a point off A's front is dominated by one on it), so a reader keeps only
    the front, not every complete trial."""
    import numpy as np
    from optuna.study._multi_objective import _is_pareto_front

    signs = np.array([-1.0 if m else 1.0 for m in maximize])
    mask = _is_pareto_front(np.asarray(points, dtype=float) * signs, assume_unique_lexsorted=False)
    return [p for p, on in zip(points, mask) if on]


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
