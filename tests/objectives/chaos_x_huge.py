"""Issue 10, case 11: an int result too large for a float."""

from chaos_x_common import record_pid


def objective(trial):
    record_pid()
    x = trial.suggest_float("x", 0, 1)
    if trial.number % 2 == 0:
        return 10**400
    return x
