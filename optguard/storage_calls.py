"""Storage calls that a signal handler must not split.

The worker's interrupt handlers raise ``GuardPruned`` in its main thread, wherever the
objective is. Raised inside a storage call, the exception lands in the middle of a SQLAlchemy
session's commit ("This session is in 'committed' state; no further SQL can be emitted") or
between taking a lock file and the ``try`` that gives it back: the call's thread cannot use
the storage again and the worker dies with a storage error. So while a thread is inside a
storage call the handler only records the interrupt, and the hook set by ``on_leaving``
raises it as the thread leaves its outermost call, where nothing is half done.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Iterator

from optguard.sqlite import in_transaction

__all__ = [
    "between_attempts",
    "guarded",
    "guarded_iter",
    "in_storage_call",
    "on_leaving",
    "storage_call",
]

_calls = threading.local()  # .depth: storage calls open in this thread
_leave_hook: Callable[[], None] | None = None


def in_storage_call() -> bool:
    """Whether this thread is inside a storage call, or this process is taking, holding or
    giving back the SQLite write lock (``optguard.sqlite.in_transaction``)."""
    return getattr(_calls, "depth", 0) > 0 or in_transaction()


def on_leaving(hook: Callable[[], None] | None) -> None:
    """Run ``hook()`` each time a thread leaves its outermost storage call (``None``: no
    hook). It may raise: the call's result is then dropped, as if the signal had come just
    after it."""
    global _leave_hook
    _leave_hook = hook


class storage_call:  # noqa: N801  (a context manager, named as one is used)
    """``with storage_call():`` marks the block as one storage call (nesting allowed). A
    class, not ``contextlib.contextmanager``: it wraps every storage method."""

    __slots__ = ("_depth",)

    def __enter__(self) -> None:
        self._depth = getattr(_calls, "depth", 0)
        _calls.depth = self._depth + 1

    def __exit__(self, *_exc: object) -> None:
        _calls.depth = self._depth
        if self._depth == 0 and _leave_hook is not None:
            _leave_hook()


class between_attempts:  # noqa: N801  (a context manager, named as one is used)
    """``with between_attempts():`` around the wait between two attempts of a storage call
    (an outage's backoff, up to ``--storage-outage``): the failed attempt's session is rolled
    back and nothing is half done, so this thread counts as outside any call meanwhile, and an
    interrupt recorded during the attempt is raised now, not after the outage."""

    __slots__ = ("_depth",)

    def __enter__(self) -> None:
        self._depth = getattr(_calls, "depth", 0)
        _calls.depth = 0
        try:
            if self._depth and _leave_hook is not None:
                _leave_hook()
        except BaseException:
            _calls.depth = self._depth
            raise

    def __exit__(self, *_exc: object) -> None:
        _calls.depth = self._depth


def guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` run as one storage call."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        with storage_call():
            return method(*args, **kwargs)

    return call


def guarded_iter(items: Iterator[Any]) -> Iterator[Any]:
    """The items of a generator that reads the storage, all read as one storage call."""
    with storage_call():
        yield from items
