"""Reports every 50 ms but never finishes on its own: the time limit must prune it."""

import time

import optuna


def objective(trial: optuna.Trial) -> float:
    trial.suggest_int("n", 0, 10)
    for step in range(10**6):
        time.sleep(0.05)
        trial.report(float(step), step)
    return 0.0
