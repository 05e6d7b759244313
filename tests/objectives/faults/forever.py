"""Every trial sleeps forever: only the supervisor can end it."""

import os
import time

from _common import record_pid


def objective(trial):
    record_pid(os.getpid())
    trial.suggest_float("x", 0, 1)
    time.sleep(10**6)
