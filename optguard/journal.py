"""Optuna's journal file as a study's storage (``--storage journal:///path.log``).

``JournalStorage(JournalFileBackend(path))`` appends one JSON record per change under
Optuna's own lock file. Two ways it goes wrong that optguard turns into one line (exit 3)
instead of an "internal error" traceback, without writing to the file:

- a file that is not a journal (an SQLite file, a text file): its first line is no record;
- a last record cut short (a full disk, a killed writer): Optuna skips it when reading, but
  the next append would be glued to it and make the whole file unreadable for good
  (optuna/optuna#5138), so a run refuses it and says how many bytes to keep.

Errors while reading or appending (a full disk, a lost network mount) are ``StorageError``.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from optguard.errors import StorageError
from optguard.storage_calls import guarded_iter, storage_call

if TYPE_CHECKING:
    import optuna

__all__ = ["open_journal", "check_journal_file"]


def check_journal_file(path: Path, settle_s: float = 0.2) -> None:
    """Refuse a file that is not a journal, or whose last record was cut short. A last record
    being appended right now by another run looks cut short for microseconds: such a file is
    looked at once more, ``settle_s`` later, before it is refused."""
    kept = 0
    try:
        with path.open("rb") as fh:
            first = fh.readline()
            size = fh.seek(0, 2)
            if size == 0:
                return
            fh.seek(max(0, size - 1))
            ends_whole = fh.read(1) == b"\n"
            if not ends_whole:
                kept = _last_newline(fh, size)
    except OSError as exc:
        raise StorageError(f"cannot read journal storage {path}: {exc.strerror}") from None
    try:
        record = json.loads(first)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError: not JSON text at all
        record = None
    if not isinstance(record, dict) or "op_code" not in record:
        raise StorageError(f"{path} is not an Optuna journal file (no journal record in it)")
    if not ends_whole and settle_s > 0:
        time.sleep(settle_s)
        return check_journal_file(path, settle_s=0)
    if not ends_whole:
        raise StorageError(
            f"journal storage {path} ends in a record cut short (a full disk or a killed "
            f"writer); keep its first {kept} bytes, e.g. `truncate -s {kept} {path}`, then "
            "run again"
        )


def _last_newline(fh: Any, size: int) -> int:
    """The length of the file up to and with its last ``\\n`` (0 if none)."""
    end = size
    while end > 0:
        start = max(0, end - 65536)
        fh.seek(start)
        found = fh.read(end - start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0


def open_journal(path: Path, create: bool) -> "optuna.storages.JournalStorage":
    """The journal storage of ``path``; ``create`` for the process that sets the study up
    (the file may not exist yet). The file is checked before anything is appended."""
    import optuna

    if not path.parent.is_dir():
        raise StorageError(f"cannot create journal storage {path}: directory does not exist")
    if not create and not path.is_file():
        raise StorageError(f"journal storage {path} does not exist")
    if path.exists():
        check_journal_file(path)
    try:
        return optuna.storages.JournalStorage(_backend_class()(str(path)))
    except OSError as exc:
        raise StorageError(f"cannot open journal storage {path}: {exc.strerror}") from None


@functools.cache
def _backend_class() -> type:
    """Optuna's ``JournalFileBackend`` whose read and write errors are ``StorageError``;
    built on first use so that importing optguard does not import Optuna."""
    from optuna.storages.journal import JournalFileBackend

    class GuardedJournalFileBackend(JournalFileBackend):  # type: ignore[misc]
        def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
            try:
                yield from guarded_iter(super().read_logs(log_number_from))
            except (OSError, ValueError) as exc:  # ValueError: a record that is not JSON
                raise _error(self._file_path, "read", exc) from None

        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            try:
                with storage_call():  # a signal must not leave the file's lock taken
                    super().append_logs(logs)
            except OSError as exc:
                raise _error(self._file_path, "write to", exc) from None

    return GuardedJournalFileBackend


def _error(path: str, what: str, exc: BaseException) -> StorageError:
    cause = getattr(exc, "strerror", None) or f"{type(exc).__name__}: {exc}"
    return StorageError(f"cannot {what} journal storage {path}: {cause}")
