"""Checkpointing objectives for ``--checkpoint-store artifacts``: a retry elsewhere resumes."""

import os
import socket

import optguard


def resumable(trial):
    """Three steps per run, resuming after the latest checkpoint; then, until `fixed` exists,
    hangs in C holding the GIL, so that only the supervisor's kill ends it. Records where it
    resumed from and on which host."""
    x = trial.suggest_float("x", 0.0, 1.0)
    ckpt = optguard.checkpoints(trial, keep=2)
    last = ckpt.latest()
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("resumed_from", None if last is None else last[0])
    trial.set_user_attr("resumed_state", None if last is None else last[1])
    start = 0 if last is None else last[0] + 1
    for step in range(start, start + 3):
        ckpt.save({"step": step, "x": x, "host": socket.gethostname()}, step)
        trial.report(x, step)
    if not os.path.exists("fixed"):
        sum(range(10**13))  # hours in C
    return x
