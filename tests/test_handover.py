"""A node stopped by its scheduler hands its trials over (``optguard.handover``): which of
the listed trials are owed a retry, and taking a list exactly once, on a real storage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import sqlite_url
from optuna.trial import TrialState

from optguard.handover import HANDOVER_PREFIX, offer, pending, ripe, settle, take_handovers
from optguard.recovery import recover
from optguard.storage import open_storage, set_trial_user_attrs


def _frozen(number: int, state: TrialState, reason: str | None) -> optuna.trial.FrozenTrial:
    attrs = {} if reason is None else {"optguard.reason": reason}
    return optuna.trial.FrozenTrial(
        number=number, state=state, value=1.0 if state == TrialState.COMPLETE else None,
        datetime_start=None, datetime_complete=None, params={}, distributions={},
        user_attrs=attrs, system_attrs={}, intermediate_values={}, trial_id=100 + number,
    )  # fmt: skip


SETTLE_CASES = [
    # (state, reason) -> retried, still running
    ((TrialState.PRUNED, "interrupted"), True, False),  # its worker's SIGTERM
    ((TrialState.PRUNED, "cancelled"), True, False),  # stuck in C, killed by the node's cancel
    ((TrialState.FAIL, "interrupted"), True, False),  # reaped: its node died before recording
    ((TrialState.COMPLETE, None), False, False),  # finished on its own before the stop
    ((TrialState.FAIL, None), False, False),  # the objective's own error: not owed again
    ((TrialState.PRUNED, "timeout"), False, False),  # a limit: --retry-pruned decides
    ((TrialState.PRUNED, None), False, False),  # the pruner's
    ((TrialState.RUNNING, None), False, True),  # not ended yet: asked again later
]


@pytest.mark.parametrize(("trial", "retried", "running"), SETTLE_CASES, ids=str)
def test_settle_retries_only_what_the_stop_ended(
    trial: tuple[TrialState, str | None], retried: bool, running: bool
) -> None:
    numbers, ids = settle([_frozen(7, *trial)])
    assert numbers == ([7] if retried else [])
    assert ids == ([107] if running else [])


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ({}, {}),
        ({HANDOVER_PREFIX + "a": {"trial_ids": [3, 1]}}, {HANDOVER_PREFIX + "a": [3, 1]}),
        ({HANDOVER_PREFIX + "a": None}, {}),  # taken
        ({HANDOVER_PREFIX + "a": {"trial_ids": []}}, {}),
        ({HANDOVER_PREFIX + "a": {"trial_ids": ["1"]}}, {}),  # not ours: ignored
        ({"optguard.control": {"action": "stop"}, "user": 1}, {}),
    ],
)
def test_pending_lists_are_read_from_the_study_user_attributes(
    attrs: dict[str, Any], expected: dict[str, list[int]]
) -> None:
    assert pending(attrs) == expected


def _end(storage: Any, trial: optuna.trial.Trial, state: TrialState, reason: str | None) -> None:
    if reason is not None:
        set_trial_user_attrs(storage, trial._trial_id, {"optguard.reason": reason})
    storage.set_trial_state_values(
        trial._trial_id, state, [1.0] if state == TrialState.COMPLETE else None
    )


def test_a_list_is_taken_once_as_its_trials_end_and_a_restart_takes_what_is_left(
    tmp_path: Path,
) -> None:
    storage = open_storage(sqlite_url(tmp_path), create_schema=True)
    study = optuna.create_study(study_name="s", storage=storage)
    sid = study._study_id
    trials = [study.ask() for _ in range(4)]
    for trial in trials:
        trial.suggest_float("x", 0, 1)
    offer(storage, sid, "nodeA", [t._trial_id for t in trials[:3]])
    offer(storage, sid, "nodeB", [trials[3]._trial_id])
    lists = pending(storage.get_study_user_attrs(sid))
    assert not ripe(storage, lists)  # nothing ended: no node takes the study-wide lock
    _end(storage, trials[0], TrialState.PRUNED, "interrupted")
    _end(storage, trials[1], TrialState.COMPLETE, None)
    assert ripe(storage, lists)
    # trial 2 still runs: A's list keeps it; B's list is all running
    assert take_handovers(study, storage, sid) == [0]
    assert take_handovers(study, storage, sid) == []  # taken once
    assert pending(storage.get_study_user_attrs(sid)) == {
        HANDOVER_PREFIX + "nodeA": [trials[2]._trial_id],
        HANDOVER_PREFIX + "nodeB": [trials[3]._trial_id],
    }
    _end(storage, trials[2], TrialState.PRUNED, "cancelled")
    _end(storage, trials[3], TrialState.PRUNED, "interrupted")
    # no live node took these: the next run's start does, with nothing taken twice
    assert recover(study, storage, sid).retried == [2, 3]
    # taken lists are deleted: every node reads the study's attributes every second
    assert not [k for k in storage.get_study_user_attrs(sid) if k.startswith(HANDOVER_PREFIX)]
    waiting = storage.get_all_trials(sid, states=(TrialState.WAITING,))
    assert sorted(t.user_attrs["optguard.retry_of"] for t in waiting) == [0, 2, 3]
    assert recover(study, storage, sid).retried == []
