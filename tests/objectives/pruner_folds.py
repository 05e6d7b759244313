"""Per-fold scores through optguard.splits, reported with step = fold id (WilcoxonPruner's
pairing): trial #0 is good (about 1.0 on every fold), every later trial worse by 1.0 on each
fold, so Wilcoxon prunes it once it has enough folds (4 at p < 0.1)."""

import optuna

import optguard

FOLDS = 10


def objective(trial: optuna.Trial) -> float:
    trial.suggest_float("x", 0.0, 1.0)
    offset = 0.0 if trial.number == 0 else 1.0
    scores = []
    for fold in optguard.splits(trial, range(FOLDS)):
        score = 1.0 + offset + 0.01 * fold  # folds differ a little: paired, not equal
        scores.append(score)
        trial.report(score, fold)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at fold {fold}")
    return sum(scores) / len(scores)
