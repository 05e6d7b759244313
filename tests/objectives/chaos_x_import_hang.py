"""Issue 10, case 7: an objective module whose import never finishes."""

import time

from chaos_x_common import record_pid

record_pid()
with open("importing.txt", "w") as fh:
    fh.write("hanging at import\n")
time.sleep(1000)


def objective(trial):
    return trial.suggest_float("x", 0, 1)
