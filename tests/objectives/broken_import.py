import optuna  # noqa: F401
import module_that_does_not_exist_xyz  # noqa: F401


def objective(trial):
    return 0.0
