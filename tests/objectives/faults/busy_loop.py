"""A pure-Python infinite loop inside a split: no check is ever reached."""

import optguard

from _common import misbehaves


def objective(trial):
    x = trial.suggest_float("x", 0, 1)
    for _fold in optguard.splits(trial, range(3)):
        if misbehaves(trial):
            n = 0
            while True:
                n += 1
    return x
