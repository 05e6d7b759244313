"""The keeper: ends everything a run started when its supervisor dies without doing so.

Workers die with their supervisor (``PR_SET_PDEATHSIG``), but what their trials started
(a ``sleep 1000``, a server, a daemon that left the process group) would be re-parented to
init and outlive a ``kill -9`` of the supervisor. The keeper is a small process in its own
session that holds the read end of a pipe only the supervisor writes to; when the pipe
closes (the supervisor exited, however it exited), it SIGKILLs every process whose inherited
environment carries this run's marker (``OPTGUARD_RUN``), and every process of the workers'
trees the supervisor told it of (``pid start-time`` lines, once a second: a child started
with an environment of its own has no marker). Only trees this run started: a pid is killed
only while its start time is the one the supervisor saw.

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
    from optguard.channel import STORAGE_ENV

    return subprocess.Popen(
        [sys.executable, "-m", "optguard.supervision.keeper", run_id],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a signal to the supervisor's process group spares it
        env={k: v for k, v in os.environ.items() if k != STORAGE_ENV},  # no password
    )


def tell_keeper(keeper: subprocess.Popen[bytes], procs: dict[int, bytes]) -> None:
    """Add processes (pid -> start time) to what the keeper ends if the supervisor dies."""
    if keeper.stdin is None or not procs:
        return
    lines = "".join(f"{pid} {start.decode()}\n" for pid, start in procs.items())
    try:
        keeper.stdin.write(lines.encode())
        keeper.stdin.flush()
    except (BrokenPipeError, ValueError):
        pass  # the keeper is gone (or closed): nothing to tell it


def _keep(run_id: str) -> None:
    from optguard.channel import RUN_ENV
    from optguard.proctree import start_time, with_marker

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    told: dict[int, bytes] = {}
    data = b""
    try:
        while chunk := os.read(0, 65536):
            *lines, data = (data + chunk).split(b"\n")
            for line in lines:
                pid, _, start = line.partition(b" ")
                if pid.isdigit():
                    told[int(pid)] = start
    except OSError:
        pass  # a broken pipe ends the wait all the same
    for _ in range(SWEEPS):
        pids = with_marker(RUN_ENV, run_id)
        pids += [pid for pid, start in told.items() if start_time(pid) == start]
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
