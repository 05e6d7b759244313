"""A segfault in C code (a NULL read through ctypes)."""

import ctypes

from _common import misbehaves


def objective(trial):
    x = trial.suggest_float("x", 0, 1)
    if misbehaves(trial):
        ctypes.string_at(0)
    return x
