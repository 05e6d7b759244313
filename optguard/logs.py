"""Plain-text worker logs with stable phrases users grep for.

One file per worker: ``<log_dir>/worker_<study>_<host>_<index>.log``. Every line is
``timestamp level worker=<index>:<pid> trial=<n> message``; no colour codes. Nothing here runs
on import: the CLI (or a test) decides which handlers exist.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

__all__ = ["worker_log_path", "worker_logger", "set_trial", "safe_name", "LOG_FORMAT"]

LOG_FORMAT = "%(asctime)s %(levelname)s worker=%(worker)s trial=%(trial)s %(message)s"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_trial: str = "-"


def set_trial(number: int | None) -> None:
    """Tag the lines that follow with this trial number (``-`` between trials)."""
    global _trial
    _trial = "-" if number is None else str(number)


def safe_name(text: str) -> str:
    """``text`` usable as one file name: anything but letters, digits, ``._-`` becomes ``_``."""
    return _UNSAFE.sub("_", text)


def worker_log_path(log_dir: Path, study: str, host: str, index: int) -> Path:
    return log_dir / f"worker_{safe_name(study)}_{safe_name(host)}_{index}.log"


class _Context(logging.Filter):
    def __init__(self, worker: str, trial: str | None = None) -> None:
        super().__init__()
        self.worker = worker
        self.trial = trial

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        if not hasattr(record, "trial"):  # a caller's extra={"trial": n} wins
            record.trial = self.trial if self.trial is not None else _trial
        return True


def worker_logger(
    path: Path, worker: str, *, name: str = "optguard.worker", trial: str | None = None
) -> logging.Logger:
    """A logger appending to one worker's file.

    The worker calls it once for itself (trial numbers follow ``set_trial``); the supervisor
    calls it with a fixed ``trial`` to add its own lines about that worker to the same file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_Context(worker, trial))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger
