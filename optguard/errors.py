"""Typed errors. The CLI maps each class to an exit code in one place (``exit_code``)."""

from __future__ import annotations

__all__ = [
    "OptguardError",
    "UsageError",
    "ConfigError",
    "ObjectiveError",
    "StorageError",
    "StorageURLError",
    "WorkerCrashError",
    "WorkerStartError",
    "StudyFailedError",
    "StudyIncompleteError",
    "CheckpointError",
    "EXIT_OK",
    "EXIT_ERROR",
    "EXIT_USAGE",
    "EXIT_STORAGE",
    "EXIT_WORKERS",
    "EXIT_FAILED",
    "EXIT_INCOMPLETE",
    "EXIT_INTERRUPTED",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_STORAGE = 3
EXIT_WORKERS = 4
EXIT_FAILED = 5  # --fail-fast: the run's first trials all failed with one error
EXIT_INCOMPLETE = 6  # the run ended without the study having its trials
EXIT_INTERRUPTED = 130


class OptguardError(Exception):
    """Base of every error optguard reports to a user as one line."""

    exit_code: int = EXIT_ERROR


class UsageError(OptguardError):
    """Bad input from the user: an option, a unit, a name."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A config file that is missing, unparseable, or has unknown keys or wrong types."""


class ObjectiveError(UsageError):
    """The objective target cannot be imported or is not callable."""


class StorageURLError(UsageError):
    """A storage URL that cannot be parsed or names an unsupported backend."""


class StorageError(OptguardError):
    """The storage is unreachable or refused an operation."""

    exit_code = EXIT_STORAGE


class WorkerCrashError(OptguardError):
    """Workers keep dying; respawning them again would loop forever."""

    exit_code = EXIT_WORKERS


class WorkerStartError(WorkerCrashError):
    """A worker never got ready within ``--start-timeout`` (its objective's import hangs)."""


class StudyFailedError(OptguardError):
    """The first trials of the run all failed with the same error, as ``study.optimize``
    would have stopped at the first one (``--fail-fast``)."""

    exit_code = EXIT_FAILED


class StudyIncompleteError(OptguardError):
    """The run ended but the study lacks trials it was asked for: exit 0 would be a lie."""

    exit_code = EXIT_INCOMPLETE


class CheckpointError(OptguardError):
    """A checkpoint cannot be written (disk full, unwritable directory) or read back.

    Raised to the objective on a failed save; the previous checkpoint is left intact.
    """
