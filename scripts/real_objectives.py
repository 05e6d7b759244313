"""Real objectives for ``scripts/bench.py --real``, of the shape of the official Optuna examples.

Each loads its data at import, as the examples do, on synthetic data so that nothing is
downloaded. The work per trial depends little on the suggested values, so that two runs of a
study (one plain, one under optguard) do comparable work whatever the sampler draws. Every
objective runs unchanged under plain ``study.optimize``.
"""

from __future__ import annotations

import numpy as np
import optuna

SEED = 0
_rng = np.random.default_rng(SEED)


def _classes(n: int, features: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes separated by a random hyperplane, with label noise."""
    x = _rng.normal(size=(n, features)).astype(np.float32)
    w = _rng.normal(size=features)
    y = ((x @ w + _rng.normal(scale=2.0, size=n)) > 0).astype(np.int64)
    return x, y


X, Y = _classes(3000, 20)


def sklearn_rf(trial: optuna.Trial) -> float:
    """optuna-examples' sklearn_simple.py: a random forest scored by 3-fold CV with
    ``n_jobs=-1`` (joblib's loky pool, which stays alive between calls)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import cross_val_score

    clf = RandomForestClassifier(
        n_estimators=40,
        max_depth=trial.suggest_int("max_depth", 8, 32, log=True),
        max_features=trial.suggest_float("max_features", 0.3, 0.7),
        random_state=SEED,
    )
    return float(cross_val_score(clf, X, Y, n_jobs=-1, cv=3).mean())


def torch_mlp(trial: optuna.Trial) -> float:
    """optuna-examples' pytorch_simple.py, on synthetic data: a small MLP, the validation
    accuracy reported after each epoch, pruned when the pruner says so."""
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    width = trial.suggest_categorical("width", [192, 256])
    lr = trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    model = nn.Sequential(
        nn.Linear(X.shape[1], width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, 2),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x_train, y_train = torch.from_numpy(X[:2400]), torch.from_numpy(Y[:2400])
    x_valid, y_valid = torch.from_numpy(X[2400:]), torch.from_numpy(Y[2400:])
    accuracy = 0.0
    for epoch in range(6):
        model.train()
        for start in range(0, len(x_train), 32):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(
                model(x_train[start : start + 32]), y_train[start : start + 32]
            )
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            accuracy = float((model(x_valid).argmax(1) == y_valid).float().mean())
        trial.report(accuracy, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return accuracy


def lightgbm_pruning(trial: optuna.Trial) -> float:
    """optuna-examples' lightgbm_integration.py: ``lgb.train`` with the pruning callback
    from optuna-integration, which reports the validation AUC at every boosting round."""
    import lightgbm as lgb
    from optuna_integration import LightGBMPruningCallback

    train = lgb.Dataset(X[:2400], label=Y[:2400])
    valid = lgb.Dataset(X[2400:], label=Y[2400:], reference=train)
    params = {
        "objective": "binary",
        "metric": "auc",
        "verbosity": -1,
        "num_leaves": trial.suggest_int("num_leaves", 48, 64),
        "min_child_samples": trial.suggest_int("min_child_samples", 5, 20),
        "learning_rate": trial.suggest_float("learning_rate", 0.02, 0.1, log=True),
        "seed": SEED,
    }
    booster = lgb.train(
        params, train, num_boost_round=300, valid_sets=[valid],
        callbacks=[LightGBMPruningCallback(trial, "auc")],
    )  # fmt: skip
    predicted = booster.predict(X[2400:]) > 0.5
    return float((predicted == Y[2400:]).mean())


def numpy_ridge(trial: optuna.Trial) -> float:
    """A NumPy-heavy objective: ridge regression solved in closed form on random features,
    its time in BLAS (matrix products and a solve)."""
    alpha = trial.suggest_float("alpha", 1e-3, 10.0, log=True)
    rng = np.random.default_rng(trial.number)
    a = rng.normal(size=(3000, 1000))
    b = a @ rng.normal(size=1000) + rng.normal(size=3000)
    loss = 0.0
    for _ in range(4):
        gram = a.T @ a + alpha * np.eye(a.shape[1])
        coef = np.linalg.solve(gram, a.T @ b)
        loss = float(np.mean((a @ coef - b) ** 2))
    return loss


# name: (objective, direction, packages it needs beyond NumPy and Optuna)
CASES = {
    "sklearn_rf": (sklearn_rf, "maximize", ("sklearn",)),
    "torch_mlp": (torch_mlp, "maximize", ("torch",)),
    "lightgbm_pruning": (lightgbm_pruning, "maximize", ("lightgbm", "optuna_integration")),
    "numpy_ridge": (numpy_ridge, "minimize", ()),
}
