"""Telling a storage outage from a refusal, and riding out an outage up to a bound.

Optuna turns every driver error of a commit into ``StorageInternalError("... e.g. exceeding
max length")``, which hides both a database server restarting (worth waiting for) and a full
disk (not). ``is_transient`` reads the driver's own error under that wrapper; ``Outage``
retries a call with exponential backoff while the errors are transient, for up to
``bound_s``, and otherwise raises ``StorageError`` naming the driver's real cause. A healthy
call costs one ``try``: nothing here runs until a call has failed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable, Iterator, TypeVar

from optguard.errors import StorageError
from optguard.storage_calls import between_attempts
from optguard.urls import mask_url, redact

__all__ = [
    "DEFAULT_OUTAGE_S",
    "Outage",
    "causes",
    "describe",
    "is_storage_error",
    "is_transient",
    "outage_of",
    "waiting_with",
]

T = TypeVar("T")

DEFAULT_OUTAGE_S = 60.0
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 2.0
MAX_CAUSE_CHARS = 300

# The driver refused for good: retrying cannot help. Checked first: wins over TRANSIENT.
# "database is locked" is here because SQLite's busy timeout (optguard.sqlite, 120 s) has
# already waited longer than an outage bound would.
PERMANENT = (
    "database or disk is full",
    "file is not a database",
    "disk i/o error",
    "readonly database",
    "no space left on device",
    "database is locked",
    "constraint",
    "duplicate",
    "no such table",
    "does not exist",
    "authentication failed",
    "access denied",
    "permission denied",
)
# The server went away or is not back yet: PostgreSQL (psycopg), MySQL/MariaDB (PyMySQL,
# mysqlclient), SQLAlchemy's own "closed connection" errors.
TRANSIENT = (
    "connection refused",
    "could not connect",
    "can't connect to",
    "connection reset",
    "connection timed out",
    "connection is closed",
    "connection is lost",
    "connection was killed",
    "closed the connection",
    "terminating connection",
    "database system is shutting down",
    "database system is starting up",
    "database system is in recovery mode",
    "database system is not yet accepting connections",
    "server has gone away",
    "lost connection",
    "server shutdown in progress",
    "broken pipe",
    "ssl syscall error",
    "no connection to the server",
    "consuming input failed",
    "sending query failed",
    "deadlock",
    "this connection is closed",
    "can't reconnect until invalid transaction is rolled back",
)
# SQLSTATE classes/codes of PostgreSQL: 08 connection exception, 57P01-03 shutdown/startup,
# 40001/40P01 serialization failure and deadlock (the transaction was rolled back).
PG_TRANSIENT_STATES = ("08", "57P01", "57P02", "57P03", "40001", "40P01")
# MySQL client/server error numbers: shutdown in progress, lock wait timeout, deadlock,
# connection killed, can't connect (socket, TCP), server has gone away, lost connection (x2).
MYSQL_TRANSIENT_CODES = frozenset({1053, 1205, 1213, 1927, 2002, 2003, 2006, 2013, 2055})

_log = logging.getLogger("optguard.outage")
_pauses = threading.local()  # .wait: this thread's wait between attempts (``waiting_with``)


@contextlib.contextmanager
def waiting_with(wait: Callable[[float], None]) -> Iterator[None]:
    """In this thread, the waits between an outage's attempts are ``wait(seconds)`` rather
    than a sleep: the gateway listens to the worker whose call it retries meanwhile, and
    abandons the call (``wait`` raises) when the worker gives up on it."""
    previous = getattr(_pauses, "wait", None)
    _pauses.wait = wait
    try:
        yield
    finally:
        _pauses.wait = previous


def causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps, outermost first: SQLAlchemy's ``.orig``, else ``__cause__``."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 16 and current not in chain:
        chain.append(current)
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return chain


def _own_text(exc: BaseException) -> str:
    """The message of one link, not counting a wrapper's copy of its SQL and parameters
    (a user attribute's value must not make an error look transient)."""
    if isinstance(getattr(exc, "orig", None), BaseException):
        return ""
    return str(exc).lower()


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` says the database server is unreachable for now (down, restarting,
    connection dropped), as opposed to a refusal that would repeat (disk full, constraint)."""
    chain = causes(exc)
    texts = [_own_text(e) for e in chain]
    if any(p in text for text in texts for p in PERMANENT):
        return False
    for link in chain:
        if getattr(link, "connection_invalidated", False):
            return True  # SQLAlchemy's dialect recognised a disconnect
        state = getattr(link, "sqlstate", None)
        if isinstance(state, str) and state.startswith(PG_TRANSIENT_STATES):
            return True
        code = link.args[0] if link.args else None
        if isinstance(code, int) and code in MYSQL_TRANSIENT_CODES:
            return True
    return any(p in text for text in texts for p in TRANSIENT)


def describe(exc: BaseException, url: str) -> str:
    """The driver's own message under the wrappers, as one line with no password."""
    root = causes(exc)[-1]
    text = " ".join(str(root).split()) or type(root).__name__
    if len(text) > MAX_CAUSE_CHARS:
        text = text[: MAX_CAUSE_CHARS - 3] + "..."
    return redact(text, url)


def is_storage_error(exc: BaseException) -> bool:
    """An error of the database or its driver, as SQLAlchemy or Optuna's RDB storage raise
    it; Optuna's own signals (``KeyError``, ``UpdateFinishedTrialError``...) are not."""
    import sqlalchemy.exc
    from optuna.exceptions import StorageInternalError

    return isinstance(exc, (sqlalchemy.exc.SQLAlchemyError, StorageInternalError))


class Outage:
    """Retries of one storage's calls through an outage of up to ``bound_s`` seconds.

    ``suspended()`` makes the calls inside it raise transient errors at once, untouched, so
    that a caller holding a lock that dies with its connection (``TrialSlots``) retries its
    whole step, lock included, rather than one call inside it.
    """

    def __init__(
        self,
        url: str,
        bound_s: float = DEFAULT_OUTAGE_S,
        relieve: Callable[[BaseException], object] | None = None,
    ) -> None:
        """``relieve(exc)``, on a refusal, may free what the storage lacked (a full disk: see
        ``optguard.sqlite.relieve_full_disk``) for the writes that follow, such as the trial
        marked failed; the refused call itself is not tried again."""
        self.url = url
        self.bound_s = max(0.0, bound_s)
        self.relieve = relieve
        self._local = threading.local()

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth

    def call(self, fn: Callable[[], T], on_retry: Callable[[], None] | None = None) -> T:
        """``fn()``, retried through an outage; ``on_retry`` runs before each new attempt."""
        try:
            return fn()
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            return self.recover(exc, fn, on_retry)

    def _refused(self, exc: BaseException) -> StorageError:
        if self.relieve is not None:
            self.relieve(exc)
        return StorageError(f"storage {mask_url(self.url)}: {describe(exc, self.url)}")

    def _unreachable(self, exc: BaseException) -> StorageError:
        return StorageError(
            f"storage {mask_url(self.url)} unreachable for {self.bound_s:g}s: "
            f"{describe(exc, self.url)}"
        )

    def poll(self, fn: Callable[[], T], default: T) -> T:
        """``fn()`` once, for a loop that must not stop while the storage is down (the
        supervisor still enforces limits): ``default`` during an outage, ``StorageError`` once
        the storage has been unreachable for ``bound_s`` over successive polls."""
        try:
            with self.suspended():
                result = fn()
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            if not is_transient(exc):
                raise self._refused(exc) from exc
            now = time.monotonic()
            down_since = getattr(self._local, "down_since", None)
            if down_since is None:
                self._local.down_since = down_since = now
                _log.warning(
                    "storage %s unreachable (%s): retrying for up to %gs",
                    mask_url(self.url), describe(exc, self.url), self.bound_s,
                )  # fmt: skip
            if now - down_since >= self.bound_s:
                raise self._unreachable(exc) from exc
            return default
        self._local.down_since = None
        return result

    def recover(
        self,
        exc: Exception,
        again: Callable[[], T],
        on_retry: Callable[[], None] | None = None,
    ) -> T:
        """After ``exc`` (a storage error) from a first attempt: ``again()`` until it works,
        the error is not transient (``StorageError`` with the cause) or ``bound_s`` is spent
        (``StorageError`` "unreachable for")."""
        start = time.monotonic()
        delay = BACKOFF_FIRST_S
        warned = False
        while True:
            if not is_transient(exc):
                raise self._refused(exc) from exc
            if getattr(self._local, "depth", 0):
                raise exc  # the caller retries its whole step
            waited = time.monotonic() - start
            if waited >= self.bound_s:
                raise self._unreachable(exc) from exc
            if not warned:
                warned = True
                _log.warning(
                    "storage %s unreachable (%s): retrying for up to %gs",
                    mask_url(self.url), describe(exc, self.url), self.bound_s,
                )  # fmt: skip
            with between_attempts():  # an interrupt is not held for the whole outage
                (getattr(_pauses, "wait", None) or time.sleep)(min(delay, self.bound_s - waited))
            delay = min(2 * delay, BACKOFF_MAX_S)
            if on_retry is not None:
                on_retry()
            try:
                result = again()
            except Exception as retried:
                if not is_storage_error(retried):
                    raise
                exc = retried
                continue
            _log.warning(
                "storage %s reachable again after %.1fs", mask_url(self.url),
                time.monotonic() - start,
            )  # fmt: skip
            return result


def outage_of(storage: Any) -> Outage:
    """The ``Outage`` of a storage opened by ``optguard.storage.open_storage``; a bound of 0
    (no retry, the cause still named) for any other storage."""
    found = getattr(storage, "outage", None)
    if isinstance(found, Outage):
        return found
    backend = getattr(storage, "_backend", None)  # behind Optuna's cache
    found = getattr(backend, "outage", None)
    if isinstance(found, Outage):
        return found
    url = str(getattr(storage, "url", getattr(backend, "url", "")))
    return Outage(url, 0.0)
