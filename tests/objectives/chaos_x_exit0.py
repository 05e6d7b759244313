"""Issue 10, case 9: os._exit(0) inside an objective (a worker that "exits cleanly")."""

import os

from chaos_x_common import first_time, record_pid


def first(trial):
    """Only the first trial of the run exits; the rest complete."""
    record_pid()
    x = trial.suggest_float("x", 0, 1)
    if first_time("exit0"):
        os._exit(0)
    return x


def always(trial):
    record_pid()
    trial.suggest_float("x", 0, 1)
    os._exit(0)
