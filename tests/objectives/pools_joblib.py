"""joblib with n_jobs=2: loky's reusable executor, kept alive between calls on purpose."""

import os

import joblib
from pools_common import descendants, pool_pid, record


def objective(trial):
    x = trial.suggest_float("x", 0, 1)
    used = sorted(set(joblib.Parallel(n_jobs=2)(joblib.delayed(pool_pid)(i) for i in range(6))))
    tree = descendants()
    record("pids.txt", os.getpid(), *tree)
    record("pools.txt", os.getpid(), trial.number, ",".join(map(str, used)), *tree)
    return x
