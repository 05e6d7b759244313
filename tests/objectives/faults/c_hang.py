"""A long C-level call that holds the GIL: no Python signal handler runs until it returns."""

from _common import misbehaves


def objective(trial):
    x = trial.suggest_float("x", 0, 1)
    trial.report(x, 0)
    if misbehaves(trial):
        return float(sum(range(10**13)))  # builtin sum over a range: hours in C, GIL held
    return x
