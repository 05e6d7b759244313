"""What a worker's exit means: pure, table-tested.

The exit code alone hides who ended a worker. A SIGKILL is optguard's own when the
supervisor sent it (the kill step, a cancel, a worker that would not exit); it is the
``RLIMIT_CPU`` hard limit when the worker had used that much CPU; it is the kernel's OOM
killer only when the kernel's count of OOM kills rose meanwhile.
"""

from __future__ import annotations

import enum
import signal

__all__ = ["Exit", "classify_exit", "describe_exit"]

EXIT_USAGE = 2
EXIT_STORAGE = 3
EXIT_RECYCLE = 75  # the worker's "replace me"


class Exit(enum.Enum):
    DONE = "done"  # after its last trial: the study has its trials, or a stop
    RECYCLE = "recycle"  # replace it (--max-trials-per-worker, --recycle-rss, a leak)
    START_FAILURE = "start_failure"  # bad objective or storage, before it got ready
    KILLED = "killed"  # optguard's kill step for its trial: recorded as such
    ENDED = "ended"  # optguard ended it (stop, cancel, start timeout, lingering, fatal)
    DIED = "died"  # anything else: its trial (if any) failed; a replacement starts


def classify_exit(
    code: int, *, ready: bool, said_exiting: bool, in_trial: bool, killed: bool, ended: bool
) -> Exit:
    """``code`` from ``Popen``; ``said_exiting``: it reported leaving after its last trial;
    ``in_trial``: a trial it started has not ended; ``killed``/``ended``: optguard did it."""
    if killed:
        return Exit.KILLED
    if code == EXIT_RECYCLE and not in_trial:
        return Exit.RECYCLE
    if ended:
        return Exit.ENDED
    if code in (EXIT_USAGE, EXIT_STORAGE) and not ready:
        return Exit.START_FAILURE
    if said_exiting and not in_trial:
        return Exit.DONE  # whatever its code: threads or atexit handlers ended it, no trial lost
    return Exit.DIED  # exit 0 without saying so (os._exit in a trial) is a death too


def describe_exit(code: int, *, sent: str | None, oom: bool, cpu_limit: bool) -> str:
    """The exit in words: ``sent`` names optguard's own signal when it sent one."""
    if code >= 0:
        return f"exit code {code}"
    signum = -code
    try:
        how = f"signal {signal.Signals(signum).name}"
    except ValueError:
        how = f"signal {signum}"
    if sent is not None:
        return f"{how} sent by optguard ({sent})"
    if signum == signal.SIGXCPU or (signum == signal.SIGKILL and cpu_limit):
        return f"{how}: its CPU time limit (RLIMIT_CPU) was reached"
    if signum == signal.SIGKILL:
        return how + (
            " from the kernel's OOM killer" if oom else " not sent by optguard (no OOM kill "
            "counted by the kernel: another process or a scheduler)"
        )
    return how
