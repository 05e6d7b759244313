"""SQLite shared by many processes: WAL, a long busy timeout, the write lock taken up front.

A read-then-write transaction that starts as a reader fails at once with "database is locked"
when another process wrote meanwhile (the busy timeout does not apply to it), so every
transaction is ``BEGIN IMMEDIATE``; optguard's own processes queue for it on a lock file,
which wakes the next one at once where SQLite's busy handler sleeps. The exception is a
storage call known to only read (``reading``): in WAL mode a reader neither waits for the
writer nor blocks it, so it takes neither lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import weakref
from pathlib import Path
from typing import Any, Iterator

from optguard.errors import StorageError

__all__ = [
    "BUSY_TIMEOUT_S",
    "prepare_file",
    "install_events",
    "in_transaction",
    "reading",
    "relieve_full_disk",
    "truncate_wal",
]

BUSY_TIMEOUT_S = 120.0
CHECKPOINT_TIMEOUT_S = 1.0  # a checkpoint waits this long for other processes' transactions


def prepare_file(path: Path) -> None:
    """Switch the file to WAL once; the mode is stored in the file and kept for all connections."""
    if not path.parent.is_dir():
        raise StorageError(f"cannot create SQLite storage {path}: directory does not exist")
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open SQLite storage {path}: {exc}") from None


def truncate_wal(path: Path) -> bool:
    """Copy the write-ahead log into the database and cut it to zero bytes; True if done.

    On a full disk the log is what grows, and it holds many copies of the same pages: giving
    its space back lets the small writes that follow (a trial marked failed) succeed. It can
    fail for the same reason (the database itself must grow) or wait on another process's
    transaction: then nothing changed.
    """
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=CHECKPOINT_TIMEOUT_S)) as conn:
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.Error:
        return False  # full even for the checkpoint, or locked: the caller's error stands
    return busy == 0


def relieve_full_disk(path: Path, error: BaseException) -> bool:
    """``optguard.outage.Outage``'s ``relieve`` for a SQLite file: on "database or disk is
    full", give the write-ahead log's space back, so that the trials the error interrupts can
    still be marked failed; True if it did."""
    from optguard.outage import causes

    if not any("database or disk is full" in str(e) for e in causes(error)):
        return False
    return truncate_wal(path)


def in_transaction() -> bool:
    """Whether this process is taking, holding or giving back the queued write lock.

    The worker's interrupt handlers raise in its main thread; raised between taking the lock
    and counting it, the lock would stay held and every other worker would wait for ever, so
    meanwhile they leave the trial to its next check (the supervisor's kill still applies).
    """
    return _busy > 0


_busy = 0  # acquires not yet released, over every lock of this process
_reads = threading.local()  # .depth: reading() calls open in this thread


@contextlib.contextmanager
def reading() -> Iterator[None]:
    """Transactions this thread begins meanwhile only read: a plain (deferred) ``BEGIN``,
    without the write lock, so that readers run beside the one writer. Only for code that
    cannot write: a deferred transaction that writes after another process did fails."""
    _reads.depth = getattr(_reads, "depth", 0) + 1
    try:
        yield
    finally:
        _reads.depth -= 1


class _WriteLock:
    """A lock file optguard's workers take before ``BEGIN IMMEDIATE`` on one SQLite file.

    SQLite's own wait for its write lock is a busy handler that sleeps 1, 2, 5, 10... ms
    between tries, so with two busy workers most transactions sleep for milliseconds after
    the lock was already free. ``flock`` wakes the next waiter as soon as it is released, and
    the kernel drops it when a process dies. It only orders the workers: SQLite's lock still
    decides, so the supervisor, the other commands and other programs on the file (and two
    transactions of one process, which share the lock here) wait with the busy timeout, and
    a Ctrl+C there is never held up by a worker. Reopened after a fork: a shared open file
    description would share the lock.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._guard = threading.Lock()
        self._fh: Any = None
        self._pid = -1
        self._depth = 0  # open transactions of this process on this file

    def acquire(self) -> None:
        global _busy
        _busy += 1  # first: from here on the worker's handlers do not raise
        try:
            with self._guard:
                if self._depth == 0:
                    if self._pid != os.getpid():
                        self._fh = self.path.open("a")
                        self._pid = os.getpid()
                    fcntl.flock(self._fh, fcntl.LOCK_EX)
                self._depth += 1
        except BaseException:
            _busy -= 1
            raise

    def release(self) -> None:
        global _busy
        with self._guard:
            self._depth -= 1
            if self._depth == 0:
                fcntl.flock(self._fh, fcntl.LOCK_UN)
        _busy -= 1  # last


def install_events(engine: Any, path: Path, queue: bool) -> None:
    """``BEGIN IMMEDIATE`` for every transaction; with ``queue`` (workers), the lock file first.

    SQLAlchemy ends every transaction that began with exactly one ``commit`` or ``rollback``
    event (closing a connection mid-transaction rolls back), and none when ``BEGIN`` failed.
    """
    from sqlalchemy import event

    lock = _WriteLock(Path(str(path) + ".optguard-txn")) if queue else None
    holding: weakref.WeakSet[Any] = weakref.WeakSet()  # connections whose transaction holds it

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let the "begin" event below issue BEGIN itself
        dbapi_conn.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; fsync at checkpoints

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if getattr(_reads, "depth", 0):
            conn.exec_driver_sql("BEGIN")
            return
        if lock is None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            return
        lock.acquire()
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            lock.release()  # no transaction began, so no commit or rollback will follow
            raise
        holding.add(conn)

    def _on_end(conn: Any) -> None:
        # Kept on the Connection object, not in conn.info: after a KeyboardInterrupt inside a
        # call, SQLAlchemy has invalidated the connection and reading its info raises here.
        if lock is not None and conn in holding:
            holding.discard(conn)
            lock.release()

    event.listen(engine, "commit", _on_end)
    event.listen(engine, "rollback", _on_end)

    engine.dispose()  # connections opened before the events were installed are dropped
