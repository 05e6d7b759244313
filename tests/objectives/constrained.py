"""An objective with a constraint (``trial.set_constraint``, Optuna 5), set before optguard
ends the trial: #1 sleeps past the time limit (pruned by interrupt), #2 is stuck in C holding
the GIL (the supervisor kills its worker). The last trial records what the samplers read of
the earlier trials' constraints, with their own functions, in the worker."""

import time

import optuna
from optuna.samplers._tpe.sampler import _get_infeasible_trial_score
from optuna.samplers.nsgaii._constraints_evaluation import _evaluate_penalty
from optuna.trial import TrialState

LAST = 4


def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -1.0, 1.0)
    # Feasible (<= 0) for the trials that complete, infeasible for those optguard ends.
    trial.set_constraint("c", 1.0 if trial.number in (1, 2) else -1.0)
    if trial.number == 1:
        time.sleep(10**6)
    if trial.number == 2:
        sum(range(10**13))  # one C call: no signal handler runs until it returns
    if trial.number == LAST:
        # What TPE and NSGA-II are given: the study's finished trials, from the storage.
        seen = trial.study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)
        )
        trial.set_user_attr(
            "tpe_infeasible", sorted(t.number for t in seen if _get_infeasible_trial_score(t) > 0)
        )
        trial.set_user_attr(
            "nsga2_penalty", {str(t.number): float(p) for t, p in zip(seen, _evaluate_penalty(seen))}
        )
    return x * x
