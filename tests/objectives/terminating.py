"""A study Optuna's terminator ends as soon as it may (20 complete trials): the objective
barely depends on x, while the cross-validation scores it reports spread widely, so the
regret bound is far below the statistical error."""

import time
import warnings

import optuna
from optuna.terminator import report_cross_validation_scores

import optguard


def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", 0.0, 1.0)
    time.sleep(0.05)  # a few trials a second: the run is still going when the stop comes
    scores = [0.01 * x + fold for fold in optguard.splits(trial, (0.0, 1.0, 2.0, 3.0))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated since Optuna 4.9
        report_cross_validation_scores(trial, scores)
    return sum(scores) / len(scores)


def no_scores(trial: optuna.Trial) -> float:
    """The same without cross-validation scores: the terminator cannot decide. Slower past
    Optuna's 20 trials: the run outlasts the first evaluation (torch's import, a GP fit)."""
    time.sleep(0.05 if trial.number < 20 else 0.15)
    return 0.01 * trial.suggest_float("x", 0.0, 1.0)
