"""Trials for the guard's evidence: #0 grows 20 MB per 0.1 s until the memory limit ends it
at a check (the worker attaches the evidence), #1 ignores SIGTERM and sits in C past the
timeout until optguard's SIGKILL (the supervisor attaches it), every later one completes."""

import signal
import time

import optuna


def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", 0.0, 1.0)
    if trial.number == 0:
        chunks = []
        for step in range(200):
            chunks.append(b"\x01" * 20_000_000)
            trial.report(float(step), step)
            time.sleep(0.1)
    elif trial.number == 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return float(sum(range(10**13)))  # hours in C with the GIL held
    return x
