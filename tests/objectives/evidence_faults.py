"""Objectives that attack the guard's evidence path (tests/test_evidence.py)."""

import os
import shutil

import optuna
from optuna.trial import TrialState


def reaped(trial: optuna.Trial) -> float:
    """Another host's reaper finishes this trial while it runs (its heartbeat looked stale
    after an outage); the objective then returns normally."""
    x = trial.suggest_float("x", 0.0, 1.0)
    other = optuna.storages.RDBStorage(os.environ["REAP_URL"])
    other.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    return x


def breaks_the_store(trial: optuna.Trial) -> float:
    """From trial 1 on, the artifact store cannot be written: a file stands where it was."""
    if trial.number == 1:
        store = os.environ["OPTGUARD_ARTIFACT_DIR"]
        shutil.rmtree(store, ignore_errors=True)
        with open(store, "w") as fh:
            fh.write("not a directory\n")
    return trial.suggest_float("x", 0.0, 1.0)


def non_ascii_error(trial: optuna.Trial) -> float:
    trial.suggest_float("x", 0.0, 1.0)
    raise ValueError("température hors limites")
