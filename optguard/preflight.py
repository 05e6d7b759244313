"""Checks of ``optguard run``'s input made before anything touches the storage.

Bad input must leave the storage as it was: no study created, no attribute rewritten. So
everything that can be known without running the objective is checked here first.
"""

from __future__ import annotations

from optguard.config import RunOptions

__all__ = ["check_run_inputs"]


def check_run_inputs(opts: RunOptions) -> None:
    """Raise ``UsageError`` (exit 2) naming the first problem found in ``opts``."""
