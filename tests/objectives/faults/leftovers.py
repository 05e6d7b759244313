"""A trial that starts `sleep 1000` and a double-forked daemon, then returns normally."""

import subprocess
import sys
import time

from _common import misbehaves, record_pid

DAEMON = """
import os, sys, time
if os.fork():
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
with open(sys.argv[1], "a") as fh:
    fh.write(f"{os.getpid()}\\n")
time.sleep(1000)
"""


def objective(trial):
    x = trial.suggest_float("x", 0, 1)
    if misbehaves(trial):
        record_pid(subprocess.Popen(["sleep", "1000"]).pid)
        subprocess.run([sys.executable, "-c", DAEMON, "pids.txt"], check=True)
        time.sleep(0.2)  # the daemon has written its pid
    return x
