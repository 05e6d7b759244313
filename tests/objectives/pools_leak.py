"""Trial #0's task leaks in a worker of a multiprocessing pool kept in a module global; the
other trials wait until trial #0 is finished, then record whether its pool worker lives."""

import multiprocessing
import os
import time

from pools_common import alive, leak_and_hold, pool_pid, record

_POOL = None


def objective(trial):
    global _POOL
    x = trial.suggest_float("x", 0, 1)
    record("pids.txt", os.getpid())
    if _POOL is None:
        _POOL = multiprocessing.Pool(2)
    if trial.number == 0:
        _POOL.apply(leak_and_hold)
        return x
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        first = trial.study.get_trials(deepcopy=False)[0]
        if first.state.is_finished():
            break
        time.sleep(0.1)
    with open("leak_pid.txt") as fh:
        leaker = int(fh.read().split()[0])
    record("after.txt", trial.number, leaker, "alive" if alive(leaker) else "gone")
    _POOL.map(pool_pid, range(4))
    return x
