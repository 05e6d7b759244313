"""Shared by the pool objectives: tasks for the pool workers (imported there by this name) and
the records the test reads."""

import os
import time

LEAK_MB = 400
LEAK_STEP_MB = 10


def record(path: str, *fields: object) -> None:
    with open(path, "a") as fh:
        fh.write(" ".join(map(str, fields)) + "\n")


def pool_pid(_: int) -> int:
    """Long enough that every worker of a small pool gets a task."""
    time.sleep(0.05)
    return os.getpid()


def leak_and_hold() -> None:
    """~200 MB/s up to LEAK_MB of written (resident) memory, then held without returning."""
    record("pids.txt", os.getpid())
    record("leak_pid.txt", os.getpid())
    chunks = []
    for _ in range(LEAK_MB // LEAK_STEP_MB):
        chunks.append(b"\x01" * (LEAK_STEP_MB * 10**6))
        time.sleep(0.05)
    time.sleep(1000)


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] != b"Z"


def descendants() -> list[int]:
    """This process's descendants, from /proc (no psutil: objectives stay plain)."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as fh:
                    stat = fh.read()
            except OSError:
                continue
            kids.setdefault(int(stat[stat.rindex(b")") + 2 :].split()[1]), []).append(int(name))
    found, stack = [], [os.getpid()]
    while stack:
        for child in kids.get(stack.pop(), ()):
            found.append(child)
            stack.append(child)
    return sorted(found)
