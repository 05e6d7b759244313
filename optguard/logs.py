"""Plain-text worker logs with stable phrases users grep for.

One file per worker: ``<log_dir>/worker_<study>_<host>_<index>.log``, each name through
``safe_name`` (a study name needing changes gets a hash: ``worker_exp_1-3f2a9c01_host_0.log``).
Every line is ``timestamp level worker=<index>:<pid> trial=<n> message``; no colour codes.
Nothing here runs on import: the CLI (or a test) decides which handlers exist.
"""

from __future__ import annotations

import hashlib
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
    """``text`` usable as one file name, unique to it.

    A name of letters, digits and ``._-`` is kept as it is (users grep
    ``logs/worker_<study>_*.log``). In any other, each run of other characters becomes ``_``
    and a short hash of the original is appended, so that ``exp/1`` and ``exp 1`` (or two
    names in another script, which both become ``_``) never share a log file or a checkpoint
    directory. The hash is SHA-256, stable across processes and hosts.
    """
    safe = _UNSAFE.sub("_", text)
    if safe == text:
        return text
    return f"{safe}-{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


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
