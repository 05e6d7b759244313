"""Each trial starts a multiprocessing pool and a `sleep 1000` and drops both: no close(), no
terminate(), no `with`, the references just go away. The next trial of the same worker
records which of them are still alive."""

import multiprocessing
import os
import subprocess

from pools_common import alive, pool_pid, record

_PREVIOUS: list[int] = []


def objective(trial):
    x = trial.suggest_float("x", 0, 1)
    left = [pid for pid in _PREVIOUS if alive(pid)]
    if left:
        record("alive.txt", trial.number, *left)
    pool = multiprocessing.Pool(2)
    pool.map(pool_pid, range(4))
    sleeper = subprocess.Popen(["sleep", "1000"])
    started = [sleeper.pid, *(p.pid for p in pool._pool)]
    record("pids.txt", os.getpid(), *started)
    _PREVIOUS[:] = started
    return x
