"""Early stopping inside a trial (EarlyStopping) and of a whole study (--patience)."""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import optguard
from optguard.early_stopping import study_plateaued

from conftest import load_trials, log_text, objective, run_cli, sqlite_url


def test_early_stopping_minimize() -> None:
    stopper = optguard.EarlyStopping(patience=3, threshold=0.05)
    results = [stopper.update(v) for v in (1.0, 0.9, 0.88, 0.87, 0.86)]
    assert results == [False, False, False, False, True]  # 0.88..0.86 gain <= 0.05 on 0.9
    assert (stopper.best, stopper.best_step) == (0.9, 1)
    assert stopper.update(0.1) is True  # once stopped, it stays stopped


def test_early_stopping_maximize_and_nan() -> None:
    stopper = optguard.EarlyStopping(patience=2, greater_is_better=True)
    assert [stopper.update(v) for v in (0.5, math.nan, 0.7, 0.6, 0.7)] == [
        False, False, False, False, True,
    ]  # fmt: skip
    assert (stopper.best, stopper.best_step) == (0.7, 2)
    with pytest.raises(ValueError, match="patience"):
        optguard.EarlyStopping(patience=0)


def _finished(values: list[float | None]) -> list[optuna.trial.FrozenTrial]:
    start = datetime.datetime(2026, 1, 1)
    return [
        optuna.trial.FrozenTrial(
            number=i, state=TrialState.COMPLETE if v is not None else TrialState.PRUNED,
            value=v, datetime_start=start, datetime_complete=start + datetime.timedelta(i),
            params={}, distributions={}, user_attrs={}, system_attrs={},
            intermediate_values={}, trial_id=i,
        )
        for i, v in enumerate(values)
    ]  # fmt: skip


def test_an_infeasible_trial_is_never_the_best_to_improve_on() -> None:
    """As ``study.best_trial``: trial #0 (value 0, a constraint violated) does not count, so
    9, 8, 7, 6 each improve (review of issue 12)."""
    trials = _finished([0, 9, 8, 7, 6])
    trials[0].system_attrs["constraints:c"] = 1.0
    assert study_plateaued(trials, 3, 0.0, False) is None
    trials[0].system_attrs["constraints:c"] = -1.0  # feasible: 0 is the best, never beaten
    assert study_plateaued(trials, 3, 0.0, False) is not None


def test_study_plateaued() -> None:
    assert study_plateaued(_finished([5, 4, 3]), 3, 0.0, False) is None  # not enough trials
    assert study_plateaued(_finished([5, 4, 3, 2]), 3, 0.0, False) is None  # improving
    reason = study_plateaued(_finished([5, 3, 3.5, None, 4]), 3, 0.0, False)
    assert reason is not None and "best value 3 did not improve" in reason
    assert study_plateaued(_finished([5, 3, 2.95, 4, 4]), 3, 0.1, False) is not None
    assert study_plateaued(_finished([1, 3, 2, 1, 1]), 3, 0.0, True) is not None
    assert study_plateaued(_finished([1, 2, 3, 1, 1]), 3, 0.0, True) is None


@pytest.mark.scenario
def test_patience_ends_a_scripted_study(tmp_path: Path, study_name: str) -> None:
    result = run_cli(
        "run", "--study", study_name, "--objective", objective("plateau.py:objective"),
        "--n-trials", "40", "--patience", "3", "--pruner", "none", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "early stopping: best value 3 did not improve by more than 0 over the last 3" in (
        result.stdout
    )
    trials = load_trials(sqlite_url(tmp_path), study_name)
    # Trial #5 is the third without improvement; the flag is polled once a second.
    assert 6 <= len(trials) <= 12
    study = optuna.load_study(study_name=study_name, storage=sqlite_url(tmp_path))
    assert study.user_attrs["optguard.early_stopped"].startswith("early stopping: best value 3")
    assert log_text(tmp_path).count("Early stopping at step 3") == len(trials)
