"""A fast plain Optuna objective with five intermediate reports per trial."""

import optuna


def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -10.0, 10.0)
    for step in range(5):
        trial.report(x * x + (5 - step), step)
    return x * x


def paced(trial: optuna.Trial) -> float:
    """The same with 100 ms of work: long enough that every started worker gets trials."""
    import time

    time.sleep(0.1)
    return objective(trial)
