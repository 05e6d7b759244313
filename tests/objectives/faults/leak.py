"""A leak of ~200 MB/s in the worker itself, with no checks."""

from _common import leak_forever, misbehaves


def objective(trial):
    x = trial.suggest_float("x", 0, 1)
    trial.report(x, 0)
    if misbehaves(trial):
        leak_forever()
    return x
