"""Shared by the fault scenarios: record every pid a scenario starts, so the test can check
that none of them is alive once ``optguard run`` has returned."""

import os
import time

LEAK_MB_PER_S = 200


def record_pid(pid: int) -> None:
    with open("pids.txt", "a") as fh:
        fh.write(f"{pid}\n")


def leak_forever() -> None:
    """~200 MB/s of written (resident) memory, no checks, never returns."""
    chunks = []
    while True:
        chunks.append(b"\x01" * (LEAK_MB_PER_S * 10**6 // 20))
        time.sleep(0.05)


def misbehaves(trial) -> bool:
    """Only the first trial misbehaves; the rest complete, so the study reaches n_trials."""
    record_pid(os.getpid())
    return trial.number == 0
