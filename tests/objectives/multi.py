"""Optuna's multi-objective example (two objectives, both minimized), with scripted trials:
#2 never ends on its own (the time limit prunes it), #5 returns NaN, #6 three values, #7 a
single number."""

import time

import optuna


def objective(trial: optuna.Trial) -> tuple[float, float] | float | list[float]:
    x = trial.suggest_float("x", 0, 5)
    y = trial.suggest_float("y", 0, 3)
    v0 = 4 * x**2 + 4 * y**2
    v1 = (x - 5) ** 2 + (y - 5) ** 2
    if trial.number == 2:
        time.sleep(10**6)  # pruned by the supervisor's interrupt past --timeout and --grace
    if trial.number == 5:
        return [v0, float("nan")]
    if trial.number == 6:
        return [v0, v1, 0.0]
    if trial.number == 7:
        return v0
    return v0, v1
