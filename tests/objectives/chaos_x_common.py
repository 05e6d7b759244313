"""Shared by the chaos_x_* objectives (tests/test_chaos_exits.py): every process a scenario
starts writes its pid to ``pids.txt`` in the run's directory, so the test can check that none
is left; ``first_time(name)`` is true exactly once per run directory (an atomic marker file)."""

import os


def record_pid(pid: int | None = None) -> None:
    with open("pids.txt", "a") as fh:
        fh.write(f"{os.getpid() if pid is None else pid}\n")


def first_time(name: str) -> bool:
    """True for the first caller only, across worker processes (O_EXCL marker file)."""
    try:
        os.close(os.open(f"marker-{name}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
