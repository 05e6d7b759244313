"""os._exit(3) in the middle of a trial: no Python cleanup at all."""

import os

from _common import misbehaves


def objective(trial):
    x = trial.suggest_float("x", 0, 1)
    if misbehaves(trial):
        os._exit(3)
    return x
