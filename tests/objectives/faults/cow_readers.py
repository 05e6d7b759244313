"""200 MB shared copy-on-write with 3 forked readers: summed RSS is ~4x what is really used."""

import multiprocessing
import os
import time

from _common import record_pid

DATA = None


def _read() -> None:
    total = 0
    for i in range(0, len(DATA), 4096):  # touch every page: resident in this child too
        total += DATA[i]
    time.sleep(1.5)


def objective(trial):
    global DATA
    record_pid(os.getpid())
    x = trial.suggest_float("x", 0, 1)
    if trial.number == 0:
        DATA = b"\x01" * 200_000_000
        ctx = multiprocessing.get_context("fork")
        readers = [ctx.Process(target=_read) for _ in range(3)]
        for r in readers:
            r.start()
            record_pid(r.pid)
        for r in readers:
            r.join()
        DATA = None
    return x
