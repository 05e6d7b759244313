"""Issue 10, case 8: a trial leaves something that blocks the worker's interpreter exit."""

import atexit
import threading
import time

from chaos_x_common import record_pid


def thread(trial):
    """The first trial starts a non-daemon thread that sleeps for ever."""
    record_pid()
    if trial.number == 0:
        threading.Thread(target=time.sleep, args=(1000,), name="chaos-lingering").start()
    return trial.suggest_float("x", 0, 1)


def at_exit(trial):
    """The first trial registers an atexit handler that blocks for ever."""
    record_pid()
    if trial.number == 0:
        atexit.register(time.sleep, 1000)
    return trial.suggest_float("x", 0, 1)
