"""Issue 10, case 15: a healthy trial inside one long C call when its interrupt arrives.

``--timeout 1 --grace 0.5``: the interrupt is sent at ~1.5 s. The first trial sleeps to 1.2 s,
then makes one C call lasting ~1-3 s, so the interrupt lands during the call and cannot be
acknowledged until it returns, well within ``--kill-after 4``. The call's measured duration
goes to ``call_s.txt``.

How long a large allocation takes on a VM varies far more than that (np.ones of 1.5 GB took
0.2 s on pages the guest had touched before and 5-8 s on fresh ones), so ``alloc`` uses a
CPU-bound one (standard_normal, 320 MB: ~0.6-2.6 s measured) and ``wait`` a C call of a fixed
2 s (a pthread mutex another thread holds: a mutex wait is not interrupted by signals).
"""

import ctypes
import signal
import threading
import time

import numpy as np
from chaos_x_common import record_pid

ALLOC_VALUES = 4 * 10**7  # 320 MB of float64
WAIT_S = 2.0
_libc = ctypes.CDLL(None)


def _alloc() -> None:
    block = np.random.default_rng(1).standard_normal(ALLOC_VALUES)  # one C call
    del block


def _wait() -> None:
    mutex = ctypes.create_string_buffer(64)  # all zero: PTHREAD_MUTEX_INITIALIZER on glibc
    held = threading.Event()

    def hold() -> None:
        _libc.pthread_mutex_lock(mutex)
        held.set()
        time.sleep(WAIT_S)
        _libc.pthread_mutex_unlock(mutex)

    threading.Thread(target=hold, daemon=True).start()
    held.wait()
    _libc.pthread_mutex_lock(mutex)  # one C call, blocked until the other thread lets go
    _libc.pthread_mutex_unlock(mutex)


def _long_call(trial, call):
    record_pid()
    x = trial.suggest_float("x", 0, 1)
    if trial.number == 0:
        time.sleep(1.2)  # past --timeout 1; the interrupt comes at timeout + grace
        start = time.monotonic()
        try:
            call()
        finally:
            with open("call_s.txt", "w") as fh:
                fh.write(f"{time.monotonic() - start:.3f}\n")
    return x


def alloc(trial):
    return _long_call(trial, _alloc)


def wait(trial):
    return _long_call(trial, _wait)


def self_check(trial):
    """The first trial reaches its own check after the interrupt was sent but before it
    lands: the worker's SIGUSR1 handler is swapped for one that only notes the signal (the
    worker has other threads, so blocking it in this one would not hold it back), and the
    trial prunes itself at its check, enforcement ``check``."""
    record_pid()
    x = trial.suggest_float("x", 0, 1)
    if trial.number == 0:
        arrived = []
        previous = signal.signal(signal.SIGUSR1, lambda signum, _frame: arrived.append(signum))
        try:
            deadline = time.monotonic() + 20
            while not arrived and time.monotonic() < deadline:
                time.sleep(0.005)
            with open("pending.txt", "w") as fh:
                fh.write(str(bool(arrived)))
            trial.report(x, 0)  # the guard's check: past --timeout, so it prunes here
        finally:
            signal.signal(signal.SIGUSR1, previous)
        raise AssertionError("the check did not prune")  # not reached
    return x
