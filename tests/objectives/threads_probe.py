"""Records what a worker sees: its thread variable, its cores and its pid.

At import (every worker imports it, trial or not) and in each trial, one line in
``$THREADS_PROBE_DIR/<pid>``: ``OMP_NUM_THREADS ncpus cpus joblib.cpu_count()``.
"""

import os
from pathlib import Path

import joblib
import optuna


def _record() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    omp = os.environ.get("OMP_NUM_THREADS")
    line = f"{omp} {len(cpus)} {','.join(map(str, cpus))} {joblib.cpu_count()}\n"
    with (Path(os.environ["THREADS_PROBE_DIR"]) / str(os.getpid())).open("a") as fh:
        fh.write(line)


_record()


def objective(trial: optuna.Trial) -> float:
    _record()
    return trial.suggest_float("x", -1.0, 1.0) ** 2
