"""A trial that waits to be SIGKILLed from outside (the test does it, as the OOM killer would)."""

import time

from _common import misbehaves


def objective(trial):
    x = trial.suggest_float("x", 0, 1)
    if misbehaves(trial):
        with open("victim.txt", "w") as fh:
            fh.write("ready")
        time.sleep(60)
    return x
