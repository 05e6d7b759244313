"""Hangs until the file `fixed` exists in the working directory: a bug, then its fix."""

import os
import time


def objective(trial):
    x = trial.suggest_float("x", 0.0, 1.0)
    with open("pids.txt", "a") as fh:
        fh.write(f"{os.getpid()}\n")
    while not os.path.exists("fixed"):
        time.sleep(0.05)
    time.sleep(float(os.environ.get("OPTGUARD_TEST_SLOW", "0")))  # let a reaper run meanwhile
    return x
