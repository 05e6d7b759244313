"""optguard: guarded Optuna studies.

Objectives use ``check`` and ``splits``; programs use ``run_study`` and ``run_worker``. Heavy
modules (optuna, sqlalchemy) load on first use, so importing optguard stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from optguard.errors import (
    CheckpointError,
    ConfigError,
    ObjectiveError,
    OptguardError,
    StorageError,
    StorageURLError,
    UsageError,
    WorkerCrashError,
)
from optguard.limits import Limits, parse_duration, parse_size

if TYPE_CHECKING:
    from optguard.checkpointing import CheckpointManager, checkpoints, prune_checkpoints
    from optguard.cleanup import CleanupReport, release_memory
    from optguard.config import RunOptions, resolve_options
    from optguard.early_stopping import EarlyStopping
    from optguard.guard import GuardPruned, TrialGuard, Violation, check, splits
    from optguard.monitor import MonitorOptions, Thresholds, run_monitor, sample
    from optguard.monitor_analysis import analyze_log
    from optguard.progress import Progress, read_progress
    from optguard.supervision import RunResult, run_study
    from optguard.worker import run_worker

__version__ = "0.1.0"

__all__ = [
    "check",
    "splits",
    "checkpoints",
    "CheckpointManager",
    "prune_checkpoints",
    "CheckpointError",
    "EarlyStopping",
    "GuardPruned",
    "TrialGuard",
    "Violation",
    "Limits",
    "parse_duration",
    "parse_size",
    "RunOptions",
    "resolve_options",
    "run_study",
    "RunResult",
    "run_worker",
    "release_memory",
    "CleanupReport",
    "Progress",
    "read_progress",
    "sample",
    "run_monitor",
    "MonitorOptions",
    "Thresholds",
    "analyze_log",
    "OptguardError",
    "UsageError",
    "ConfigError",
    "ObjectiveError",
    "StorageError",
    "StorageURLError",
    "WorkerCrashError",
]

_LAZY = {
    "checkpoints": "optguard.checkpointing",
    "CheckpointManager": "optguard.checkpointing",
    "prune_checkpoints": "optguard.checkpointing",
    "EarlyStopping": "optguard.early_stopping",
    "check": "optguard.guard",
    "splits": "optguard.guard",
    "GuardPruned": "optguard.guard",
    "TrialGuard": "optguard.guard",
    "Violation": "optguard.guard",
    "RunOptions": "optguard.config",
    "resolve_options": "optguard.config",
    "run_study": "optguard.supervision",
    "RunResult": "optguard.supervision",
    "run_worker": "optguard.worker",
    "release_memory": "optguard.cleanup",
    "CleanupReport": "optguard.cleanup",
    "Progress": "optguard.progress",
    "read_progress": "optguard.progress",
    "sample": "optguard.monitor",
    "run_monitor": "optguard.monitor",
    "MonitorOptions": "optguard.monitor",
    "Thresholds": "optguard.monitor",
    "analyze_log": "optguard.monitor_analysis",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'optguard' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
