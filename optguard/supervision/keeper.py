"""The keeper: ends everything a run started when its supervisor dies without doing so.

Workers die with their supervisor (``PR_SET_PDEATHSIG``), but what their trials started
(a ``sleep 1000``, a server, a daemon that left the process group) would be re-parented to
init and outlive a ``kill -9`` of the supervisor. The keeper is a small process in its own
session that holds the read end of a pipe only the supervisor writes to; when the pipe
closes (the supervisor exited, however it exited), it SIGKILLs every process whose inherited
environment carries this run's marker (``OPTGUARD_RUN``): only trees this run started.

Run as ``python -m optguard.supervision.keeper MARKER``; it imports nothing heavy.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

__all__ = ["start_keeper"]

SWEEPS = 5  # processes forking while being killed: look again a few times
SWEEP_PAUSE_S = 0.1


def start_keeper(run_id: str) -> subprocess.Popen[bytes]:
    """Start the keeper of run ``run_id``; close its ``stdin`` to let it sweep and exit."""
    return subprocess.Popen(
        [sys.executable, "-m", "optguard.supervision.keeper", run_id],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a signal to the supervisor's process group spares it
    )


def _keep(run_id: str) -> None:
    from optguard.channel import RUN_ENV
    from optguard.proctree import with_marker

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while os.read(0, 4096):
            pass  # nothing is ever written: waiting for the end of the pipe
    except OSError:
        pass  # a broken pipe ends the wait all the same
    for _ in range(SWEEPS):
        pids = with_marker(RUN_ENV, run_id)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue  # gone meanwhile
        time.sleep(SWEEP_PAUSE_S)


if __name__ == "__main__":
    _keep(sys.argv[1])
