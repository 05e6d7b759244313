"""A trial whose child ignores SIGTERM and is left running."""

import subprocess
import sys
import time

from _common import misbehaves, record_pid

STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(1000)"


def objective(trial):
    x = trial.suggest_float("x", 0, 1)
    if misbehaves(trial):
        record_pid(subprocess.Popen([sys.executable, "-c", STUBBORN]).pid)
        time.sleep(0.3)  # the child has installed its handler
    return x
