"""Grows by 50 MB per report (pages written, so resident): the memory limit must prune it."""

import time

import optuna


def objective(trial: optuna.Trial) -> float:
    trial.suggest_int("n", 0, 10)
    chunks = []
    for step in range(200):
        chunks.append(b"\x01" * 50_000_000)
        trial.report(float(step), step)
        time.sleep(0.01)
    return float(len(chunks))
