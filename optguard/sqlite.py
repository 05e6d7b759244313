"""SQLite shared by many processes: WAL, a long busy timeout, the write lock taken up front.

A read-then-write transaction that starts as a reader fails at once with "database is locked"
when another process wrote meanwhile (the busy timeout does not apply to it), so every
transaction is ``BEGIN IMMEDIATE``; optguard's own processes queue for it on a lock file,
which wakes the next one at once where SQLite's busy handler sleeps.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from optguard.errors import StorageError

__all__ = ["BUSY_TIMEOUT_S", "prepare_file", "install_events"]

BUSY_TIMEOUT_S = 120.0


def prepare_file(path: Path) -> None:
    """Switch the file to WAL once; the mode is stored in the file and kept for all connections."""
    if not path.parent.is_dir():
        raise StorageError(f"cannot create SQLite storage {path}: directory does not exist")
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open SQLite storage {path}: {exc}") from None


class _WriteLock:
    """A lock file every optguard process takes before ``BEGIN IMMEDIATE`` on one SQLite file.

    SQLite's own wait for its write lock is a busy handler that sleeps 1, 2, 5, 10... ms
    between tries, so with two busy workers most transactions sleep for milliseconds after
    the lock was already free. ``flock`` wakes the next waiter as soon as it is released, and
    the kernel drops it when a process dies. It only orders optguard's own processes: SQLite's
    lock still decides, so other programs on the file (and two transactions of one process,
    which share the lock here) fall back to the busy timeout. Reopened after a fork: a shared
    open file description would share the lock.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._guard = threading.Lock()
        self._fh: Any = None
        self._pid = -1
        self._depth = 0  # open transactions of this process

    def acquire(self) -> None:
        with self._guard:
            if self._depth == 0:
                if self._pid != os.getpid():
                    self._fh = self.path.open("a")
                    self._pid = os.getpid()
                fcntl.flock(self._fh, fcntl.LOCK_EX)
            self._depth += 1

    def release(self) -> None:
        with self._guard:
            self._depth -= 1
            if self._depth == 0:
                fcntl.flock(self._fh, fcntl.LOCK_UN)


def install_events(engine: Any, path: Path) -> None:
    from sqlalchemy import event

    lock = _WriteLock(Path(str(path) + ".optguard-txn"))
    held = "optguard_write_lock"  # key in the DBAPI connection's info: this one holds the lock

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let the "begin" event below issue BEGIN itself
        dbapi_conn.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; fsync at checkpoints

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        lock.acquire()
        conn.info[held] = True
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            _release(conn.info)  # no transaction began, so no commit or rollback will follow
            raise

    def _release(info: dict[str, Any]) -> None:
        if info.pop(held, False):
            lock.release()

    event.listen(engine, "commit", lambda conn: _release(conn.info))
    event.listen(engine, "rollback", lambda conn: _release(conn.info))
    # A connection given back to the pool ends whatever transaction it had.
    event.listen(engine, "checkin", lambda _dbapi, record: _release(record.info))

    engine.dispose()  # connections opened before the events were installed are dropped
