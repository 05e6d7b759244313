"""The same leak in a child process the trial forked; the trial waits for it."""

import multiprocessing

from _common import leak_forever, misbehaves, record_pid


def objective(trial):
    x = trial.suggest_float("x", 0, 1)
    trial.report(x, 0)
    if misbehaves(trial):
        child = multiprocessing.get_context("fork").Process(target=leak_forever)
        child.start()
        record_pid(child.pid)
        child.join()
    return x
