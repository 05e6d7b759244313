"""Starts `sleep 1000` and waits (until the file `fixed` exists), as a trial that runs a tool.

The worker's pid goes to ``pids.txt``, the child's to ``children.txt``. With
``CHAOS_SETSID=1`` the child leaves the worker's process group (``start_new_session``), as a
tool that daemonizes would.
"""

import os
import subprocess
import time


def objective(trial):
    x = trial.suggest_float("x", 0.0, 1.0)
    with open("pids.txt", "a") as fh:
        fh.write(f"{os.getpid()}\n")
    own_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}  # CHAOS_OWN_ENV: no marker
    child = subprocess.Popen(
        ["sleep", "1000"],
        start_new_session=os.environ.get("CHAOS_SETSID") == "1",
        env=own_env if os.environ.get("CHAOS_OWN_ENV") == "1" else None,
    )
    with open("children.txt", "a") as fh:
        fh.write(f"{child.pid}\n")
    try:
        while not os.path.exists("fixed"):
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
    return x
