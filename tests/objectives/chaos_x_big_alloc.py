"""Issue 10, case 14: one numpy call that allocates ~1.5 GB, far above --max-rss.

The first trial writes its worker's pid to ``worker_pid.txt``, waits for the test to create
``go`` (the test then polls the worker's VmHWM), makes the call, and keeps the memory: only
optguard's kill ends it. Later trials allocate nothing.
"""

import os
import time

import numpy as np
from chaos_x_common import record_pid

SIZE = int(1.5e9)  # bytes


def _first(trial, allocate):
    record_pid()
    x = trial.suggest_float("x", 0, 1)
    if trial.number != 0:
        return x
    with open("worker_pid.txt.tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.rename("worker_pid.txt.tmp", "worker_pid.txt")
    deadline = time.monotonic() + 60
    while not os.path.exists("go") and time.monotonic() < deadline:
        time.sleep(0.01)
    block = allocate()  # one C call; a Python signal handler cannot run until it returns
    with open("allocated.txt", "w") as fh:
        fh.write(str(block.nbytes))
    time.sleep(60)  # hold it
    return x


def ones(trial):
    """np.ones, as in the issue (fast on warm memory, slow on memory the VM never touched)."""
    return _first(trial, lambda: np.ones(SIZE // 8))


def normal(trial):
    """The same size from one call whose fill rate is bound by the CPU (~0.3-0.8 GB/s), so a
    10 Hz memory watch sees it pass the ceiling long before it is done."""
    return _first(trial, lambda: np.random.default_rng(0).standard_normal(SIZE // 8))
