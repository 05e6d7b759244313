"""k-fold cross-validation of ridge regression on synthetic data, numpy only.

A plain Optuna objective: it reports the running mean score after every fold, so optguard
checks the trial's limits before every split without this file importing optguard.

    optguard run --study demo --objective scripts/examples/kfold.py:objective --n-trials 20
"""

from __future__ import annotations

import numpy as np
import optuna

N_SAMPLES = 2000
N_FEATURES = 20
N_FOLDS = 5


def make_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N_SAMPLES, N_FEATURES))
    w = rng.normal(size=N_FEATURES)
    y = x @ w + rng.normal(scale=0.5, size=N_SAMPLES)
    return x, y


X, Y = make_data()


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    return np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ y)


def objective(trial: optuna.Trial) -> float:
    alpha = trial.suggest_float("alpha", 1e-4, 1e3, log=True)
    n_features = trial.suggest_int("n_features", 2, N_FEATURES)
    folds = np.array_split(np.arange(N_SAMPLES), N_FOLDS)
    scores = []
    for step, test_idx in enumerate(folds):
        train_idx = np.setdiff1d(np.arange(N_SAMPLES), test_idx)
        w = fit_ridge(X[train_idx, :n_features], Y[train_idx], alpha)
        pred = X[test_idx, :n_features] @ w
        scores.append(float(np.mean((pred - Y[test_idx]) ** 2)))
        trial.report(float(np.mean(scores)), step)  # optguard checks its limits here
        if trial.should_prune():
            raise optuna.TrialPruned()
    return float(np.mean(scores))
