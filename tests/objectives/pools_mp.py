"""A multiprocessing pool kept in a module global, started by the first trial that needs it."""

import multiprocessing
import os

from pools_common import descendants, pool_pid, record

_POOL = None


def objective(trial):
    global _POOL
    x = trial.suggest_float("x", 0, 1)
    if _POOL is None:
        _POOL = multiprocessing.Pool(2)
    used = sorted(set(_POOL.map(pool_pid, range(6))))
    tree = descendants()
    record("pids.txt", os.getpid(), *tree)
    record("pools.txt", os.getpid(), trial.number, ",".join(map(str, used)), *tree)
    return x
