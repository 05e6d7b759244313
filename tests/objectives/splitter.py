"""Checks only through optguard.splits (a CV loop) and optguard.check, never reports."""

import time

import optuna

import optguard


def objective(trial: optuna.Trial) -> float:
    trial.suggest_int("n", 0, 10)
    total = 0.0
    for fold in optguard.splits(trial, range(10**6)):
        time.sleep(0.05)
        total += fold
    return total


def objective_check(trial: optuna.Trial) -> float:
    trial.suggest_int("n", 0, 10)
    while True:
        time.sleep(0.05)
        optguard.check(trial)
