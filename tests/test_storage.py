"""The SQLite write lock that orders the workers' transactions: never left held."""

from __future__ import annotations

import fcntl
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import sqlite_url
from sqlalchemy import text

from optguard.guard import GuardPruned, TrialGuard
from optguard.limits import Limits
from optguard.sqlite import in_transaction
from optguard.storage import open_storage
from optguard.worker import _Supervised

HOLD = """
import sys, time
from sqlalchemy import text
from optguard.storage import open_storage
storage = open_storage(sys.argv[1], queue_writes=True)
conn = storage.engine.connect()
conn.execute(text("SELECT 1"))  # a transaction begins: the write lock is taken
print("holding", flush=True)
time.sleep(3600)
"""


def _lock_is_free(db: Path) -> bool:
    with open(str(db) + ".optguard-txn", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def _storage(tmp_path: Path) -> optuna.storages.RDBStorage:
    url = sqlite_url(tmp_path)
    optuna.create_study(study_name="s", storage=open_storage(url, create_schema=True))
    return open_storage(url, queue_writes=True)


def test_lock_is_held_for_a_transaction_and_released_by_commit_rollback_and_close(
    tmp_path: Path,
) -> None:
    storage = _storage(tmp_path)
    db = tmp_path / "optguard.db"
    for end in ("commit", "rollback", "close"):
        conn = storage.engine.connect()
        conn.execute(text("SELECT 1"))
        assert not _lock_is_free(db), end
        getattr(conn, end)()
        if end != "close":
            conn.close()
        assert _lock_is_free(db), end
    optuna.load_study(study_name="s", storage=storage).ask()  # Optuna's own sessions too
    assert _lock_is_free(db)


def test_a_killed_holder_does_not_block_the_others(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, sqlite_url(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        assert not _lock_is_free(tmp_path / "optguard.db")
    finally:
        holder.kill()
        holder.wait()
    start = time.monotonic()
    optuna.load_study(study_name="s", storage=storage).ask()
    assert time.monotonic() - start < 5  # not SQLite's 120 s busy timeout: the kernel let go
    assert _lock_is_free(tmp_path / "optguard.db")


def test_a_worker_interrupt_waits_while_its_transaction_is_open(tmp_path: Path) -> None:
    """Raised between taking the lock and counting it, an interrupt would leave it held for
    ever: the worker's handlers do not raise inside a queued transaction."""
    storage = _storage(tmp_path)
    trial = optuna.load_study(study_name="s", storage=storage).ask()
    supervised = _Supervised()
    supervised.begin(TrialGuard(trial, Limits()))
    supervised.in_objective = True
    conn = storage.engine.connect()
    conn.execute(text("SELECT 1"))
    assert in_transaction()
    supervised._on_term(signal.SIGTERM, None)  # deferred: the trial ends at its next check
    conn.commit()
    conn.close()
    assert not in_transaction()
    with pytest.raises(GuardPruned):
        supervised._on_term(signal.SIGTERM, None)
    assert _lock_is_free(tmp_path / "optguard.db")
