"""Issue 10, case 10: studies whose trials fail."""

import time

from chaos_x_common import record_pid

PACE_S = 0.1  # trials that take a moment, as real ones do: "far fewer than N" is then countable


def boom(trial):
    record_pid()
    trial.suggest_float("x", 0, 1)
    time.sleep(PACE_S)
    raise ValueError("boom")


def pair(trial):
    """A multi-objective result under a single-objective study."""
    record_pid()
    time.sleep(PACE_S)
    return trial.suggest_float("x", 0, 1), trial.suggest_float("y", 0, 1)


ERRORS = (ValueError, RuntimeError, KeyError)


def mixed(trial):
    """Every trial fails, but not with the same error."""
    record_pid()
    trial.suggest_float("x", 0, 1)
    raise ERRORS[trial.number % len(ERRORS)](f"failure of kind {trial.number % len(ERRORS)}")


def first_completes(trial):
    """Trial #0 completes, every later one raises the same error."""
    record_pid()
    x = trial.suggest_float("x", 0, 1)
    if trial.number == 0:
        return x
    raise ValueError("boom")
