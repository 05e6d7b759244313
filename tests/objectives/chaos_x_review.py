"""Objectives for the regression tests of the review of issue 10's fixes."""

import os
import signal
import time

from chaos_x_common import record_pid

if os.environ.get("CHAOS_DIE_AT_IMPORT") == "1":
    os.kill(os.getpid(), signal.SIGSEGV)  # the import itself kills the worker


def objective(trial):
    record_pid()
    return trial.suggest_float("x", 0, 1)


def waits(trial):
    """Waits until the file `fixed` exists, without ever checking."""
    record_pid()
    x = trial.suggest_float("x", 0, 1)
    with open("running.txt", "a") as fh:
        fh.write(f"{trial.number}\n")
    while not os.path.exists("fixed"):
        time.sleep(0.05)
    return x
