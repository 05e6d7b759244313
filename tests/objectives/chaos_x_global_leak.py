"""Issue 10, case 16: memory that no cleanup can give back.

The first trial appends ~350 MB (written, so resident) to a module-level list right before
returning; the worker's memory after cleanup is then above ``--max-rss 300MB`` for good.
Later trials allocate nothing, and report once (a guard check).
"""

from chaos_x_common import record_pid

KEPT = []
LEAK_BYTES = 350 * 10**6


def objective(trial):
    record_pid()
    x = trial.suggest_float("x", 0, 1)
    trial.report(x, 0)
    if trial.number == 0:
        KEPT.append(b"\x01" * LEAK_BYTES)  # one C call, then straight back
    return x
