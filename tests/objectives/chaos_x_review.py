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


def reaped_meanwhile(trial):
    """Trial #0 is finished by "another host" while it runs (as a reap after a missed
    heartbeat does), then returns a value as if nothing happened."""
    x = trial.suggest_float("x", 0, 1)
    if trial.number == 0:
        from optguard.recovery import mark_interrupted

        storage = trial.study._storage._backend  # the RDB storage behind Optuna's cache
        mark_interrupted(storage, trial._trial_id, "no heartbeat: reaped in a test")
    return x
