"""A hang in time.sleep."""

import time

from _common import misbehaves


def objective(trial):
    x = trial.suggest_float("x", 0, 1)
    trial.report(x, 0)
    if misbehaves(trial):
        time.sleep(10**6)
    return x
