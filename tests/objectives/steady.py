"""Two seconds of work with a report every 100 ms: stops only at a check."""

import time


def objective(trial):
    x = trial.suggest_float("x", 0.0, 1.0)
    for step in range(20):
        time.sleep(0.1)
        trial.report(x, step)
    return x
