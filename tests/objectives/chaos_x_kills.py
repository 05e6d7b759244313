"""Issue 10, case 23: SIGKILLs that are not the kernel's OOM killer."""

import resource
import signal
import time

from chaos_x_common import record_pid


def c_hang(trial):
    """The first trial ignores SIGTERM and then sits in a GIL-holding C call: only
    optguard's SIGKILL ends it."""
    record_pid()
    x = trial.suggest_float("x", 0, 1)
    if trial.number == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return float(sum(range(10**13)))  # builtin sum over a range: hours in C, GIL held
    return x


def _spin() -> None:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        pass


def cpu_limit(trial):
    """The first trial sets RLIMIT_CPU (1, 2) on its worker, as in the issue, then spins."""
    record_pid()
    x = trial.suggest_float("x", 0, 1)
    if trial.number == 0:
        resource.setrlimit(resource.RLIMIT_CPU, (1, 2))
        _spin()
    return x


def cpu_limit_hard(trial):
    """SIGXCPU ignored, so the hard limit's SIGKILL is what ends the worker."""
    record_pid()
    x = trial.suggest_float("x", 0, 1)
    if trial.number == 0:
        signal.signal(signal.SIGXCPU, signal.SIG_IGN)
        used = resource.getrusage(resource.RUSAGE_SELF)
        cpu = int(used.ru_utime + used.ru_stime)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu + 1, cpu + 2))
        _spin()
    return x
