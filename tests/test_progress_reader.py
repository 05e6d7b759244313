"""``ProgressReader``: the same ``Progress`` as a fresh ``read_progress`` after every change,
for a per-read cost that follows what changed, not how many trials the study has finished.
On real SQLite and the real local PostgreSQL."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import optuna
import pytest
from conftest import PG_URL, sqlite_url
from optuna.trial import TrialState, create_trial

from optguard.progress import REASON, ProgressReader, read_progress
from optguard.storage import open_storage

INF = math.inf


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_and_name(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Any, str]]:
    if request.param == "sqlite":
        yield open_storage(sqlite_url(tmp_path), create_schema=True), "s"
    else:
        name = request.getfixturevalue("pg_study")  # deleted after the test
        yield open_storage(PG_URL, create_schema=True), name


def _same(reader: ProgressReader, storage: Any, study_id: int) -> Any:
    got = reader.read()
    assert got == read_progress(storage, study_id)
    return got


def _finished(state: TrialState, value: Any = None, reason: str | None = None, **c: Any) -> Any:
    values = value if isinstance(value, list) else None
    return create_trial(
        state=state,
        value=None if values is not None or state != TrialState.COMPLETE else value,
        values=values if state == TrialState.COMPLETE else None,
        user_attrs={} if reason is None else {REASON: reason},
        system_attrs=c,
    )


@pytest.mark.parametrize(
    "directions",
    [["minimize"], ["maximize"], ["minimize", "maximize"]],
    ids=["min", "max", "multi"],
)
def test_reader_equals_read_progress_after_each_step(
    storage_and_name: tuple[Any, str], directions: list[str]
) -> None:
    storage, name = storage_and_name
    study = optuna.create_study(study_name=name, storage=storage, directions=directions)
    sid = study._study_id
    multi = len(directions) > 1

    def v(x: float) -> Any:
        return [x, -x] if multi else x

    clock = FakeClock()
    reader = ProgressReader(storage, sid, clock=clock)
    _same(reader, storage, sid)  # empty study
    # finished trials of every kind, constraints (new and old style), infinite values
    study.add_trials(
        [
            _finished(TrialState.COMPLETE, v(3.0)),
            _finished(TrialState.COMPLETE, v(-1.0), **{"constraints:c": 1.0}),  # infeasible
            _finished(TrialState.COMPLETE, v(5.0), **{"constraints": [-1.0, 0.0]}),
            _finished(TrialState.COMPLETE, v(-INF)),
            _finished(TrialState.COMPLETE, v(INF)),
            _finished(TrialState.PRUNED, reason="memory_limit"),
            _finished(TrialState.FAIL, reason="timeout"),
            _finished(TrialState.FAIL),
        ]
    )
    _same(reader, storage, sid)
    # running trials (one already carrying a reason) and enqueued ones
    running = [study.ask() for _ in range(3)]
    storage.set_trial_user_attr(running[0]._trial_id, REASON, "memory_limit")
    storage.set_trial_system_attr(running[1]._trial_id, "constraints:c", -2.0)
    study.enqueue_trial({"x": 0.5})
    study.enqueue_trial({"x": 0.25})
    _same(reader, storage, sid)
    _same(reader, storage, sid)  # nothing changed
    # the running ones finish; a waiting one is taken; a new best
    study.tell(running[0], state=TrialState.PRUNED)
    study.tell(running[1], v(-7.0))
    clock.now += 60  # past the grace window: the settled ids are not read again
    _same(reader, storage, sid)
    taken = study.ask()  # pops the oldest WAITING trial
    storage.set_trial_user_attr(running[2]._trial_id, REASON, "timeout")
    study.tell(running[2], state=TrialState.FAIL)
    _same(reader, storage, sid)
    study.tell(taken, v(2.0))
    study.add_trial(_finished(TrialState.COMPLETE, v(-9.0), **{"constraints:c": 0.5}))
    got = _same(reader, storage, sid)
    assert got.states == {"COMPLETE": 8, "PRUNED": 2, "FAIL": 3, "WAITING": 1}
    assert got.prune_reasons == {"memory_limit": 2, "timeout": 2}
    if not multi:
        assert got.best_value == (5.0 if directions == ["maximize"] else -7.0)
    else:
        assert got.pareto_front == len(study.best_trials)
    # a second reader, from scratch, agrees too
    assert ProgressReader(storage, sid).read() == got


def _insert_trial(conn: Any, study_id: int, trial_id: int | None = None) -> int:
    """A RUNNING trial inserted by a writer that takes no study lock."""
    from optuna.storages._rdb import models
    from sqlalchemy import insert

    row = {"study_id": study_id, "number": 0, "state": TrialState.RUNNING,
           "datetime_start": datetime.now()}  # fmt: skip
    if trial_id is not None:
        row["trial_id"] = trial_id
    result = conn.execute(insert(models.TrialModel).values(**row))
    return int(result.inserted_primary_key[0])


def test_a_lower_id_committed_late_is_counted(storage_and_name: tuple[Any, str]) -> None:
    """An id drawn before another but committed after it (a writer without the study lock)
    is counted by the next read within the grace window."""
    storage, name = storage_and_name
    study = optuna.create_study(study_name=name, storage=storage)
    sid = study._study_id
    study.add_trial(_finished(TrialState.COMPLETE, 1.0))
    clock = FakeClock()
    reader = ProgressReader(storage, sid, clock=clock)
    _same(reader, storage, sid)
    clock.now += 60
    engine = storage.engine
    if engine.dialect.name == "sqlite":  # one writer: lay the ids out by hand
        with engine.begin() as conn:
            top = _insert_trial(conn, sid)
            _insert_trial(conn, sid, top + 2)
        assert _same(reader, storage, sid).running == 2  # top and top + 2
        clock.now += 1
        with engine.begin() as conn:
            _insert_trial(conn, sid, top + 1)  # the lower id, committed later
    else:
        slow = engine.connect()
        slow.begin()
        _insert_trial(slow, sid)  # draws the lower id, commits last
        with engine.begin() as conn:
            _insert_trial(conn, sid)
            _insert_trial(conn, sid)
        assert _same(reader, storage, sid).running == 2  # not the slow one yet
        clock.now += 1
        slow.commit()
        slow.close()
    got = _same(reader, storage, sid)
    assert got.states == {"COMPLETE": 1, "RUNNING": 3}


def _bulk_finished(storage: Any, study_id: int, n: int) -> None:
    """``n`` finished trials in two statements (Optuna's add_trials takes a commit each)."""
    from optuna.storages._rdb import models
    from sqlalchemy import insert, select

    states = [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    now = datetime.now()
    with storage.engine.begin() as conn:
        conn.execute(
            insert(models.TrialModel),
            [{"study_id": study_id, "number": i, "state": states[i % 3], "datetime_start": now,
              "datetime_complete": now} for i in range(n)],  # fmt: skip
        )
        ids = conn.execute(
            select(models.TrialModel.trial_id, models.TrialModel.state).where(
                models.TrialModel.study_id == study_id
            )
        ).all()
        conn.execute(
            insert(models.TrialValueModel),
            [{"trial_id": i, "objective": 0, "value": float(i % 97), "value_type": "FINITE"}
             for i, s in ids if s == TrialState.COMPLETE],  # fmt: skip
        )
        conn.execute(
            insert(models.TrialUserAttributeModel),
            [{"trial_id": i, "key": REASON, "value_json": '"timeout"'}
             for i, s in ids if s == TrialState.PRUNED],  # fmt: skip
        )


def test_a_read_fetches_what_changed_not_the_study(storage_and_name: tuple[Any, str]) -> None:
    """With 2,000 finished trials, reads after the first fetch rows for the new and the
    unfinished trials only (counted by the reader, and on PostgreSQL by the driver too)."""
    from sqlalchemy import event

    storage, name = storage_and_name
    study = optuna.create_study(study_name=name, storage=storage)
    sid = study._study_id
    _bulk_finished(storage, sid, 2000)
    seen = {"statements": 0, "rows": 0}

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not statement.lstrip().upper().startswith("SELECT"):
            return  # SQLite's BEGIN
        seen["statements"] += 1
        seen["rows"] += max(cursor.rowcount, 0)  # SQLite reports -1 for a SELECT

    clock = FakeClock()
    reader = ProgressReader(storage, sid, clock=clock)
    assert _same(reader, storage, sid).finished == 2000
    assert reader.last_rows >= 2000  # the first read is one pass over the study
    event.listen(storage.engine, "after_cursor_execute", count)
    try:

        def read() -> ProgressReader:
            seen.update(statements=0, rows=0)
            reader.read()
            assert seen["statements"] == reader.last_statements
            if storage.engine.dialect.name == "postgresql":
                assert seen["rows"] == reader.last_rows
            return reader

        assert (read().last_rows, reader.last_statements) == (0, 1)  # nothing new
        study.add_trial(_finished(TrialState.COMPLETE, -1.0))
        study.add_trial(_finished(TrialState.PRUNED, reason="memory_limit"))
        running = study.ask()
        # states of 3 trials, one reason, one value (no constraints)
        assert read().last_rows == 5
        clock.now += 60
        assert read().last_rows == 1  # settled: only the running trial's state
        study.tell(running, 0.5)
        assert read().last_rows == 2  # its state and its value
    finally:
        event.remove(storage.engine, "after_cursor_execute", count)
    assert _same(reader, storage, sid).finished == 2003
