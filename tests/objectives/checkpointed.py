"""Objectives that checkpoint with ``optguard.checkpoints``; behaviour set by env variables.

CKPT_TEST_CHECKS=0: no checks (only an interrupt or a signal ends the loop).
CKPT_TEST_CALLBACK_S: how long the emergency callback works before it saves.
"""

import os
import time

import optguard


def _record_pid() -> None:
    with open("pids.txt", "a") as fh:
        fh.write(f"{os.getpid()}\n")


def looping(trial):
    """Saves every step; the emergency callback saves the step it was at, marked."""
    _record_pid()
    ckpt = optguard.checkpoints(trial, keep=2)
    state = {"step": 0}
    checks = os.environ.get("CKPT_TEST_CHECKS", "1") == "1"
    pause = float(os.environ.get("CKPT_TEST_CALLBACK_S", "0"))

    @ckpt.on_interrupt
    def emergency():
        time.sleep(pause)
        ckpt.save({"step": state["step"], "emergency": True}, state["step"])

    for step in range(600):
        state["step"] = step
        ckpt.save({"step": step, "emergency": False}, step)
        time.sleep(0.1)
        if checks:
            trial.report(0.5, step)
    return 0.5


def resumable(trial):
    """Three steps per run, resuming after the latest checkpoint; hangs in C until `fixed`."""
    _record_pid()
    x = trial.suggest_float("x", 0.0, 1.0)
    ckpt = optguard.checkpoints(trial)
    last = ckpt.latest()
    trial.set_user_attr("resumed_from", None if last is None else last[0])
    start = 0 if last is None else last[0] + 1
    for step in range(start, start + 3):
        ckpt.save({"step": step, "x": x}, step)
        trial.report(x, step)
    if not os.path.exists("fixed"):
        sum(range(10**13))  # hours in C holding the GIL: only the supervisor's kill ends it
    return x
