"""Issue 10, case 22: ``trial.study.stop()`` inside an objective.

The first trial numbered 3 or more to get here (marker file) calls it and completes.
"""

import time

from chaos_x_common import first_time, record_pid


def objective(trial):
    record_pid()
    x = trial.suggest_float("x", 0, 1)
    time.sleep(0.2)
    if trial.number >= 3 and first_time("stop"):
        with open("stopper.txt", "w") as fh:
            fh.write(str(trial.number))
        trial.study.stop()
    return x
