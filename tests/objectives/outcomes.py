"""One objective per outcome a worker must survive: each trial ends as stated."""

import sys

import optuna


def mixed(trial: optuna.Trial) -> float:
    """Trial 0 completes, trial 1 is pruned by the objective, trial 2 raises."""
    x = trial.suggest_float("x", 0.0, 1.0)
    kind = trial.number % 3
    if kind == 1:
        raise optuna.TrialPruned("pruned by the objective")
    if kind == 2:
        raise ValueError(f"boom in trial {trial.number}")
    return x


def raises(trial: optuna.Trial) -> float:
    trial.suggest_float("x", 0.0, 1.0)
    raise RuntimeError("objective exploded\nsecond line: the real cause")


def returns_nan(trial: optuna.Trial) -> float:
    trial.suggest_float("x", 0.0, 1.0)
    return float("nan")


def returns_text(trial: optuna.Trial) -> str:
    trial.suggest_float("x", 0.0, 1.0)
    return "not a number"


def calls_exit(trial: optuna.Trial) -> float:
    trial.suggest_float("x", 0.0, 1.0)
    sys.exit(3)


def reports_torch(trial: optuna.Trial) -> float:
    """1.0 if torch is imported in the worker: the cleanup must never import it."""
    trial.suggest_float("x", 0.0, 1.0)
    return 1.0 if "torch" in sys.modules else 0.0


not_callable = 42
