"""The SQLite write lock that orders the workers' transactions: never left held. Storage
errors: an outage told from a refusal, retried up to a bound, named by the driver's cause."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import psycopg
import pymysql
import pytest
import sqlalchemy.event
import sqlalchemy.exc
from conftest import MYSQL_URL, PG_URL, sqlite_url
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.trial import TrialState
from sqlalchemy import text

from optguard.errors import StorageError
from optguard.guard import GuardPruned, TrialGuard
from optguard.limits import Limits
from optguard.outage import Outage, describe, is_transient
from optguard.sqlite import in_transaction, relieve_full_disk
from optguard.storage import TrialSlots, open_storage, set_closing_attrs, set_trial_user_attrs
from optguard.storage_calls import on_leaving
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
    supervised.ready = True  # before it is ready, a worker's SIGTERM leaves at once
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


@contextlib.contextmanager
def _worker_handlers(trial: optuna.trial.Trial) -> Iterator[_Supervised]:
    """The worker's real signal handlers in this process, as in a worker running ``trial``'s
    objective; the test process's own handlers come back afterwards."""
    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
    previous = {s: signal.getsignal(s) for s in handled}
    supervised = _Supervised()
    supervised.install()
    supervised.ready = True
    supervised.begin(TrialGuard(trial, Limits()))
    supervised.in_objective = True
    try:
        yield supervised
    finally:
        on_leaving(None)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@pytest.mark.parametrize("when", ["commit", "after_commit"])
@pytest.mark.parametrize("call", ["read", "write"])
def test_a_sigterm_inside_a_storage_commit_is_raised_once_the_call_is_left(
    tmp_path: Path, call: str, when: str
) -> None:
    """CI, stop 10: a SIGTERM that landed in a read's commit (reads take no write lock) was
    raised inside SQLAlchemy's commit; the session was left 'committed', the next call failed
    with "no further SQL can be emitted" and the worker died with a storage error instead of
    ending its trial as interrupted. Raised just before a write's commit, it lost the write.
    The signal here is a real one, sent from the connection's commit (before the database's)
    or from the session's ``after_commit``."""
    storage = _storage(tmp_path)
    study = optuna.load_study(study_name="s", storage=storage)
    trial = study.ask()
    sent: list[str] = []

    def send(*_args: object) -> None:
        if not sent:
            sent.append("SIGTERM")
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs inside the commit

    target = storage.engine if when == "commit" else storage.scoped_session
    sqlalchemy.event.listen(target, when, send)
    with _worker_handlers(trial) as supervised:
        with pytest.raises(GuardPruned) as raised:
            if call == "read":
                storage.get_all_trials(study._study_id)
            else:
                storage.set_trial_user_attr(trial._trial_id, "x", 1)
        assert sent and raised.value.violation.reason == "interrupted"
        sqlalchemy.event.remove(target, when, send)
        supervised.in_objective = False
        stored = storage.get_trial(trial._trial_id)  # the thread's session still works
        assert stored.user_attrs == ({} if call == "read" else {"x": 1})
        study.tell(trial, state=TrialState.PRUNED)
        assert storage.get_trial(trial._trial_id).state == TrialState.PRUNED
    assert _lock_is_free(tmp_path / "optguard.db")


class _Proxy:
    """A TCP forwarder to the real PostgreSQL that can be cut: a real outage (connections
    reset, then refused) without stopping the server other tests use."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.conns: list[socket.socket] = []
        self.restore()

    def restore(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.port = self.listener.getsockname()[1]
        self.down = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # cut
            server = socket.create_connection(self.target)
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass  # the other side was cut
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.down = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        self.listener.close()
        for sock in self.conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def test_an_interrupt_is_not_held_for_a_whole_storage_outage(study_name: str) -> None:
    """Review: an interrupt that came while a storage call rode out an outage was held until
    the storage came back (up to --storage-outage): the kill step then SIGKILLed the trial and
    its emergency checkpoints never ran. The wait between attempts is outside the call."""
    host, port = sqlalchemy.engine.make_url(PG_URL).host, sqlalchemy.engine.make_url(PG_URL).port
    proxy = _Proxy((host or "127.0.0.1", port or 5432))
    url = str(sqlalchemy.engine.make_url(PG_URL).set(host="127.0.0.1", port=proxy.port))
    storage = open_storage(url, create_schema=True, outage_s=60)
    study = optuna.create_study(study_name=study_name, storage=storage)
    trial = study.ask()
    proxy.cut()
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    back = threading.Timer(15.0, proxy.restore)  # the outage ends, well before --storage-outage
    timer.start()
    back.start()
    try:
        with _worker_handlers(trial), pytest.raises(GuardPruned) as raised:
            storage.set_trial_intermediate_value(trial._trial_id, 0, 1.0)  # as trial.report
        assert proxy.down  # raised during the outage, not once the storage was back
        assert raised.value.violation.reason == "interrupted"
    finally:
        timer.cancel()
        back.cancel()
        optuna.delete_study(study_name=study_name, storage=PG_URL)


# -- storage errors: optguard.outage ----------------------------------------------------------


def _as_optuna_raises(orig: BaseException, params: object = None) -> BaseException:
    """``orig`` as a failed commit reaches optguard: SQLAlchemy's error, under Optuna's."""
    wrapped = sqlalchemy.exc.OperationalError("UPDATE trials SET ...", params, orig)  # type: ignore[arg-type]
    outer = StorageInternalError(
        "An exception is raised during the commit. This typically happens due to invalid data "
        "in the commit, e.g. exceeding max length. "
    )
    outer.__cause__ = wrapped
    return outer


TRANSIENT_CASES = [
    (psycopg.OperationalError(
        'connection failed: connection to server at "127.0.0.1", port 5 failed: '
        "Connection refused\n\tIs the server running on that host?"), True),
    (psycopg.OperationalError(
        "consuming input failed: terminating connection due to administrator command"), True),
    (psycopg.OperationalError("server closed the connection unexpectedly"), True),
    (psycopg.OperationalError("FATAL: the database system is shutting down"), True),
    (psycopg.OperationalError("the connection is closed"), True),
    (pymysql.err.OperationalError(2006, "MySQL server has gone away"), True),
    (pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query"), True),
    (pymysql.err.OperationalError(
        2003, "Can't connect to MySQL server on '127.0.0.1' ([Errno 111] Connection refused)"),
     True),
    (pymysql.err.OperationalError(1213, "Deadlock found when trying to get lock"), True),
    (sqlite3.OperationalError("database or disk is full"), False),
    (sqlite3.DatabaseError("file is not a database"), False),
    (sqlite3.OperationalError("database is locked"), False),  # the busy timeout already waited
    (sqlite3.IntegrityError("UNIQUE constraint failed: studies.study_name"), False),
    (psycopg.errors.UniqueViolation("duplicate key value violates unique constraint"), False),
    (psycopg.OperationalError('database "nope" does not exist'), False),
    (pymysql.err.OperationalError(1045, "Access denied for user 'u'@'h'"), False),
    (pymysql.err.OperationalError(1050, "Table 'studies' already exists"), False),
]  # fmt: skip


@pytest.mark.parametrize(("orig", "transient"), TRANSIENT_CASES, ids=lambda c: str(c)[:40])
def test_an_outage_is_told_from_a_refusal_under_optunas_wrapper(
    orig: BaseException, transient: bool
) -> None:
    assert is_transient(orig) is transient
    assert is_transient(_as_optuna_raises(orig)) is transient


def test_only_the_drivers_words_count_not_the_statements_parameters() -> None:
    """A user attribute that reads "connection refused" does not make a full disk transient."""
    full = _as_optuna_raises(sqlite3.OperationalError("database or disk is full"),
                             {"value_json": '"connection refused"'})  # fmt: skip
    assert not is_transient(full)
    invalidated = sqlalchemy.exc.OperationalError(
        "SELECT 1", None, psycopg.OperationalError(""), connection_invalidated=True
    )
    assert is_transient(invalidated)  # SQLAlchemy's dialect saw the disconnect


def test_the_cause_is_the_drivers_message_in_one_line_without_password() -> None:
    url = "postgresql://u:hunter2@db:5432/x"
    exc = _as_optuna_raises(psycopg.OperationalError(
        'connection failed: password "hunter2" rejected\n\tIs the server running?'))
    assert describe(exc, url) == 'connection failed: password "***" rejected Is the server running?'


def _failing(errors: list[BaseException]) -> tuple[list[int], object]:
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return "done"

    return calls, fn


def test_outage_retries_transient_errors_then_gives_up_with_the_cause() -> None:
    url = "postgresql://u:hunter2@db/x"
    refused = psycopg.OperationalError("connection failed: Connection refused (hunter2)")
    calls, fn = _failing([_as_optuna_raises(refused), _as_optuna_raises(refused)])
    assert Outage(url, 5.0).call(fn) == "done" and len(calls) == 3  # type: ignore[arg-type]

    calls, fn = _failing([_as_optuna_raises(refused)] * 100)
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        Outage(url, 0.5).call(fn)  # type: ignore[arg-type]
    assert time.monotonic() - start < 5 and len(calls) >= 2
    assert str(err.value) == (
        "storage postgresql://u:***@db/x unreachable for 0.5s: "
        "connection failed: Connection refused (***)"
    )


def test_outage_raises_a_refusal_at_once_and_lets_other_errors_through() -> None:
    calls, fn = _failing([_as_optuna_raises(sqlite3.OperationalError("database or disk is full"))])
    with pytest.raises(StorageError, match=r"^storage sqlite:////x.db: database or disk is full$"):
        Outage("sqlite:////x.db", 60.0).call(fn)  # type: ignore[arg-type]
    assert len(calls) == 1
    calls, fn = _failing([KeyError("no study")])
    with pytest.raises(KeyError):
        Outage("sqlite:////x.db", 60.0).call(fn)  # type: ignore[arg-type]
    outage = Outage("sqlite:////x.db", 60.0)
    calls, fn = _failing([_as_optuna_raises(psycopg.OperationalError("connection refused"))])
    with outage.suspended(), pytest.raises(StorageInternalError):
        outage.call(fn)  # type: ignore[arg-type]  # the caller retries its whole step
    assert len(calls) == 1


def test_poll_keeps_a_loop_going_through_an_outage_until_the_bound() -> None:
    refused = psycopg.OperationalError("connection refused")
    outage = Outage("postgresql://db/x", 0.3)
    calls, fn = _failing([_as_optuna_raises(refused)] * 2)
    assert outage.poll(fn, "later") == "later"  # type: ignore[arg-type]
    assert outage.poll(fn, "later") == "later"  # type: ignore[arg-type]
    assert outage.poll(fn, "later") == "done"  # type: ignore[arg-type]  # back: the clock resets
    calls, fn = _failing([_as_optuna_raises(refused)] * 100)
    with pytest.raises(StorageError, match="unreachable for 0.3s: connection refused"):
        while True:
            outage.poll(fn, None)  # type: ignore[arg-type]
            time.sleep(0.05)


def test_a_file_that_is_not_a_database_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "optguard.db").write_bytes(b"not sqlite at all " * 100)
    with pytest.raises(StorageError) as err:
        open_storage(sqlite_url(tmp_path))
    assert "file is not a database" in str(err.value)
    assert "exceeding max length" not in str(err.value)


def test_a_full_disk_gets_the_write_ahead_logs_space_back(tmp_path: Path) -> None:
    """What a refusal for a full disk frees, so that the trials it interrupted can be marked."""
    storage = _storage(tmp_path)
    study = optuna.load_study(study_name="s", storage=storage)
    for _ in range(20):
        study.tell(study.ask(), 1.0)
    wal = tmp_path / "optguard.db-wal"
    assert wal.stat().st_size > 0
    assert not relieve_full_disk(tmp_path / "optguard.db", sqlite3.OperationalError("locked"))
    assert wal.stat().st_size > 0
    full = _as_optuna_raises(sqlite3.OperationalError("database or disk is full"))
    assert relieve_full_disk(tmp_path / "optguard.db", full)
    assert wal.stat().st_size == 0
    assert len(study.get_trials()) == 20  # all in the database file now


def _lose_commit_reply(storage: optuna.storages.RDBStorage, trials_above: int = -1) -> None:
    """The next commit (with more than ``trials_above`` trials in the file) goes through, then
    the driver reports an error, as when a server's reply is lost with its connection (SQLite
    has no such error: a server's words stand in)."""
    dialect = storage.engine.dialect
    commit = dialect.do_commit

    def do_commit(dbapi_connection: sqlite3.Connection) -> None:
        commit(dbapi_connection)
        (trials,) = dbapi_connection.execute("SELECT count(*) FROM trials").fetchone()
        if trials > trials_above:
            dialect.do_commit = commit  # type: ignore[method-assign]
            raise sqlite3.OperationalError("server closed the connection unexpectedly")

    dialect.do_commit = do_commit  # type: ignore[method-assign]


def test_a_retried_finish_whose_commit_went_through_counts_as_done(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    study = optuna.load_study(study_name="s", storage=storage)
    trial = study.ask()
    _lose_commit_reply(storage)
    assert storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [1.5]) is True
    (done,) = study.get_trials()
    assert done.state == TrialState.COMPLETE and done.value == 1.5


def test_a_claim_whose_commit_reply_was_lost_is_not_created_twice(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    study = optuna.load_study(study_name="s", storage=storage)
    slots = TrialSlots(storage, "s")
    owner = {"optguard.worker": "host:1"}
    _lose_commit_reply(storage, trials_above=0)  # the commit that creates the trial
    trial = slots.claim(study, 5, owner)
    assert trial is not None
    (only,) = storage.get_all_trials(study._study_id)
    assert only.number == trial.number and only.state == TrialState.RUNNING
    assert only.user_attrs == owner
    slots.close()


def test_reads_run_beside_a_held_write_lock_and_writes_wait_for_it(tmp_path: Path) -> None:
    """A storage call that only reads takes neither the lock file nor SQLite's write lock
    (WAL readers run beside the writer); a write still waits for the holder."""
    import threading

    storage = _storage(tmp_path)
    study = optuna.load_study(study_name="s", storage=storage)
    trial_id = study.ask()._trial_id
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, sqlite_url(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        read = threading.Thread(target=lambda: storage.get_all_trials(study._study_id))
        write = threading.Thread(target=lambda: storage.set_trial_user_attr(trial_id, "k", 1))
        read.start()
        write.start()
        read.join(timeout=60)
        assert not read.is_alive()  # done while the holder still holds the lock
        assert write.is_alive()  # waits: the holder is alive and holds it
    finally:
        holder.kill()
        holder.wait()
    write.join(timeout=60)
    assert not write.is_alive()
    assert storage.get_trial(trial_id).user_attrs == {"k": 1}
    assert _lock_is_free(tmp_path / "optguard.db")


def test_closing_attributes_are_written_by_the_finish_even_when_it_is_retried(
    tmp_path: Path,
) -> None:
    storage = _storage(tmp_path)
    study = optuna.load_study(study_name="s", storage=storage)
    first, second = study.ask(), study.ask()
    set_closing_attrs(storage, first._trial_id, {"optguard.final_rss_bytes": 1})
    storage.set_trial_user_attr(first._trial_id, "seen", True)  # not a finish: still pending
    assert storage.get_trial(first._trial_id).user_attrs == {"seen": True}
    study.tell(first, 1.0)
    set_closing_attrs(storage, second._trial_id, {"optguard.final_rss_bytes": 2})
    _lose_commit_reply(storage)
    assert storage.set_trial_state_values(second._trial_id, TrialState.PRUNED) is True
    done = {t.number: t for t in study.get_trials()}
    assert done[0].state == TrialState.COMPLETE
    assert done[0].user_attrs == {"seen": True, "optguard.final_rss_bytes": 1}
    assert done[1].state == TrialState.PRUNED
    assert done[1].user_attrs == {"optguard.final_rss_bytes": 2}
    assert storage.closing_attrs == {}  # nothing left behind for a later trial


def test_a_claim_counts_to_the_total_and_still_pops_an_enqueued_retry(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    study = optuna.load_study(study_name="s", storage=storage)
    slots = TrialSlots(storage, "s")
    owner = {"optguard.worker": "host:1"}
    claimed = [slots.claim(study, 3, owner) for _ in range(4)]
    assert [t.number if t else None for t in claimed] == [0, 1, 2, None]
    study.enqueue_trial({"x": 1.0})
    retry = slots.claim(study, 3, owner)  # the total is reached, the enqueued trial still runs
    assert retry is not None and retry.number == 3
    assert slots.claim(study, 3, owner) is None
    trials = storage.get_all_trials(study._study_id)
    assert [t.state for t in trials] == [TrialState.RUNNING] * 4
    assert all(t.user_attrs == owner for t in trials)
    assert retry.suggest_float("x", 0, 2) == 1.0  # the cache knows the popped trial
    slots.close()


@pytest.mark.parametrize("url_fixture", ["pg_study", "mysql_study"])
def test_claims_beside_plain_asks_number_the_trials_without_a_gap_or_a_twin(
    url_fixture: str, request: pytest.FixtureRequest
) -> None:
    """A claim numbers its trial from the counts it already made under the study row's
    lock (not Optuna's second count): plain ``study.ask()`` in other threads, each on its
    own storage, takes the same lock, so numbers stay 0..n-1, each once."""
    name = request.getfixturevalue(url_fixture)
    url = PG_URL if url_fixture == "pg_study" else MYSQL_URL
    optuna.create_study(study_name=name, storage=url)
    errors: list[BaseException] = []

    def claims(n: int) -> None:
        storage = open_storage(url)
        slots = TrialSlots(storage, name)
        try:
            for _ in range(n):
                slots.claim_row(None, {"optguard.worker": threading.current_thread().name})
        except BaseException as exc:  # deliberately broad: the test thread reports it
            errors.append(exc)
        finally:
            slots.close()
            storage.engine.dispose()

    def asks(n: int) -> None:
        study = optuna.load_study(study_name=name, storage=url)
        try:
            for _ in range(n):
                study.ask()
        except BaseException as exc:  # deliberately broad: the test thread reports it
            errors.append(exc)

    threads = [threading.Thread(target=claims, args=(15,)) for _ in range(2)]
    threads += [threading.Thread(target=asks, args=(15,)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(60))
    by_id = sorted(trials, key=lambda t: t._trial_id)
    assert [t.number for t in by_id] == list(range(60))  # in creation order, as Optuna



@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "mysql"])
def test_several_user_attributes_are_one_upsert_that_overwrites_and_refuses_a_finished_trial(
    kind: str, tmp_path: Path, study_name: str
) -> None:
    """``set_trial_user_attrs`` and the finish write all their keys in one statement (Optuna
    writes two per key), new keys and overwritten ones alike, and a finished trial refuses."""
    url = {"sqlite": sqlite_url(tmp_path), "postgresql": PG_URL, "mysql": MYSQL_URL}[kind]
    storage = open_storage(url, create_schema=True)
    study = optuna.create_study(study_name=study_name, storage=storage)
    try:
        trial_id = study.ask()._trial_id
        storage.set_trial_user_attr(trial_id, "b", "old")
        inserts: list[str] = []

        def count(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            if statement.lstrip().upper().startswith("INSERT INTO TRIAL_USER_ATTRIBUTES"):
                inserts.append(statement)

        sqlalchemy.event.listen(storage.engine, "before_cursor_execute", count)
        attrs = {"a": 1, "b": [1.5, "x"], "c": {"k": None}}
        set_trial_user_attrs(storage, trial_id, attrs)
        assert len(inserts) == 1
        storage.closing_attrs[trial_id] = {"c": "done", "d": True}
        storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [1.0])
        assert len(inserts) == 2  # the finish: one more
        trial = storage.get_trial(trial_id)
        assert trial.user_attrs == {"a": 1, "b": [1.5, "x"], "c": "done", "d": True}
        assert trial.state == TrialState.COMPLETE
        with pytest.raises(UpdateFinishedTrialError):
            set_trial_user_attrs(storage, trial_id, {"e": 1})
        assert "e" not in storage.get_trial(trial_id).user_attrs
    finally:
        if kind != "sqlite":
            optuna.delete_study(study_name=study_name, storage=storage)
        storage.engine.dispose()

@pytest.mark.parametrize("needle", ["INSERT INTO trial_user_attributes", "FROM trials"])
def test_a_ctrl_c_inside_a_call_propagates_and_leaves_no_lock_held(
    tmp_path: Path, needle: str
) -> None:
    """SQLAlchemy invalidates the connection on a KeyboardInterrupt; the lock must still be
    let go, and the interrupt must not turn into a retried "outage"."""
    storage = _storage(tmp_path)
    trial_id = optuna.load_study(study_name="s", storage=storage).ask()._trial_id
    dialect = storage.engine.dialect
    execute = dialect.do_execute
    armed = [True]

    def interrupted(cursor: object, statement: str, *args: object) -> object:
        if armed[0] and needle in statement:
            armed[0] = False
            raise KeyboardInterrupt
        return execute(cursor, statement, *args)

    dialect.do_execute = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        if needle.startswith("INSERT"):
            storage.set_trial_user_attr(trial_id, "k", 1)
        else:
            storage.get_trial(trial_id)
    assert not in_transaction()
    assert _lock_is_free(tmp_path / "optguard.db")
    storage.set_trial_user_attr(trial_id, "k2", 2)  # the storage works on
    assert storage.get_trial(trial_id).user_attrs["k2"] == 2
    assert _lock_is_free(tmp_path / "optguard.db")


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_progress_best_and_front_leave_infeasible_trials_out(tmp_path: Path, kind: str) -> None:
    """As ``study.best_trial(s)``: the best value and the Pareto front are over feasible
    trials only, from SQL on an RDB storage and from the trials on a journal file."""
    from optguard.progress import read_progress

    url = sqlite_url(tmp_path) if kind == "sqlite" else f"journal:///{tmp_path}/j.log"
    storage = open_storage(url, create_schema=True)
    single = optuna.create_study(study_name="one", storage=storage)
    multi = optuna.create_study(study_name="two", storage=storage, directions=["minimize"] * 2)
    for value, constraint in ((0.0, 1.0), (5.0, -1.0), (3.0, None)):
        attrs = {} if constraint is None else {"constraints:c": constraint}
        single.add_trial(optuna.trial.create_trial(value=value, system_attrs=attrs))
        multi.add_trial(
            optuna.trial.create_trial(values=[value, -value], system_attrs=attrs)
        )
    assert read_progress(storage, single._study_id).best_value == 3.0  # not the infeasible 0
    assert single.best_value == 3.0
    front = read_progress(storage, multi._study_id).pareto_front
    assert front == len(multi.best_trials) == 2  # (5, -5) and (3, -3); not (0, 0)
