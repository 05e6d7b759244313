"""Opening the study's storage, safely shared by many worker processes and hosts.

SQLite is the embedded default and needs care to be shared by concurrent processes (see
``optguard.sqlite``), with the schema created once by the parent before workers start.
PostgreSQL and MySQL need nothing special.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import threading
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from optguard.errors import StorageError, StorageURLError, UsageError
from optguard.outage import DEFAULT_OUTAGE_S, Outage, describe, is_transient, outage_of
from optguard.sqlite import (
    BUSY_TIMEOUT_S,
    install_events,
    prepare_file,
    reading,
    relieve_full_disk,
)
from optguard.storage_calls import guarded
from optguard.urls import DEFAULT_DB, journal_path, mask_url, redact, resolve_url, sqlite_path
from optguard.user_attrs import upsert_user_attrs

if TYPE_CHECKING:
    import optuna

__all__ = [
    "DEFAULT_DB",
    "DEFAULT_OUTAGE_S",
    "resolve_url",
    "mask_url",
    "redact",
    "open_storage",
    "open_existing_study",
    "TrialSlots",
    "is_rdb",
    "rdb_backend",
    "set_closing_attrs",
    "set_trial_user_attrs",
]

LOCK_SUFFIX = ".optguard-lock"  # beside a SQLite file: trial slots and schema creation
PG_CONNECT_TIMEOUT_S = 10  # psycopg waits for ever by default; PyMySQL's default is 10 s

# The RDBStorage methods that open their own session: what Optuna, its cache, the worker and
# the supervisor call. Those calling one of these (create_new_trial, get_all_trials...) are
# covered through it.
_RETRIED = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_trial_user_attrs",
    "get_trial_system_attrs", "get_all_studies", "_set_trial_param",
    "get_trial_param", "set_trial_intermediate_value", "set_trial_user_attr",
    "set_trial_system_attr", "get_trial_id_from_study_id_trial_number", "get_trial",
    "_get_trials", "_get_best_trial_id", "record_heartbeat", "_get_stale_trial_ids",
)  # fmt: skip
# Of those, the ones that only read: on SQLite they run beside the writer (``sqlite.reading``).
_READ_ONLY = frozenset(name for name in _RETRIED if name.startswith(("get_", "_get_")))


def _retried(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` retried through an outage by the storage's ``Outage``; when the storage is
    healthy the cost is this ``try``."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            if not _storage_error(exc):
                raise
            return self.outage.recover(exc, lambda: method(self, *args, **kwargs))

    return call


def _read_only(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method``, whose transactions only read: see ``optguard.sqlite.reading``."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        with reading():
            return method(self, *args, **kwargs)

    return call


def _storage_error(exc: BaseException) -> bool:
    from optguard.outage import is_storage_error

    return is_storage_error(exc)


@functools.cache
def _outage_storage_class() -> type:
    """``RDBStorage`` whose calls ride out an outage (``optguard.outage``); built on first
    use so that importing optguard does not import Optuna."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages import BaseStorage, RDBStorage
    from optuna.trial import TrialState

    class OutageRidingStorage(RDBStorage):  # type: ignore[misc]
        outage: Outage

        def __init__(self, url: str, *, outage_s: float, **kwargs: Any) -> None:
            path = sqlite_path(url)
            relieve = None if path is None else functools.partial(relieve_full_disk, path)
            self.outage = Outage(url, outage_s, relieve)
            # user attributes to write in the transaction that finishes the trial
            self.closing_attrs: dict[int, dict[str, Any]] = {}
            super().__init__(url, **kwargs)

        def set_trial_state_values(
            self, trial_id: int, state: TrialState, values: Any = None
        ) -> bool:
            """A retry that finds the trial already in the finished ``state`` it was to be
            set to is done: the attempt that lost its connection had committed."""
            attrs = self.closing_attrs.pop(trial_id, None) if state.is_finished() else None
            set_state: Callable[..., bool] = (
                RDBStorage.set_trial_state_values
                if not attrs
                else functools.partial(type(self)._finish_with_attrs, attrs=attrs)
            )

            def again() -> bool:
                try:
                    return set_state(self, trial_id, state, values)
                except UpdateFinishedTrialError:
                    if state.is_finished() and RDBStorage.get_trial(self, trial_id).state == state:
                        return True
                    raise

            try:
                return set_state(self, trial_id, state, values)
            except Exception as exc:
                if not _storage_error(exc):
                    raise
                return self.outage.recover(exc, again)

        def _finish_with_attrs(
            self, trial_id: int, state: TrialState, values: Any, attrs: dict[str, Any]
        ) -> bool:
            """Optuna's ``set_trial_state_values`` for a finished state, with ``attrs`` in
            the same transaction: one commit fewer per trial, and no finished trial without
            its final attributes."""
            from datetime import datetime

            from optuna.storages._rdb import models
            from optuna.storages._rdb.storage import _create_scoped_session

            with _create_scoped_session(self.scoped_session) as session:
                row = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
                self.check_trial_is_updatable(trial_id, row.state)
                upsert_user_attrs(self, session, trial_id, attrs)
                for objective, value in enumerate(values or ()):
                    self._set_trial_value_without_commit(session, row, objective, value)
                row.state = state
                row.datetime_complete = datetime.now()
            return True

        def _create_new_trial(self, study_id: int, template_trial: Any = None) -> Any:
            """Optuna's, in one attempt: its own loop would repeat a creation whose commit went
            through but whose reply was lost, leaving a duplicate RUNNING trial. Retries come
            from the outage handling (``TrialSlots.claim`` looks for the trial first)."""
            return self.outage.call(lambda: self._create_trial_once(study_id, template_trial))

        def _create_trial_once(self, study_id: int, template_trial: Any) -> Any:
            import copy

            from optuna.storages._rdb import models
            from optuna.storages._rdb.storage import _create_scoped_session
            from optuna.trial import FrozenTrial

            with _create_scoped_session(self.scoped_session) as session:
                # the study row's lock orders the trial numbers, as in Optuna
                models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
                row = self._get_prepared_new_trial(study_id, template_trial, session)
                if template_trial is not None:
                    frozen = copy.deepcopy(template_trial)
                    frozen.number = row.number
                    frozen.datetime_start = row.datetime_start
                    frozen._trial_id = row.trial_id
                    return frozen
                return FrozenTrial(
                    number=row.number, state=row.state, value=None, values=None,
                    datetime_start=row.datetime_start, datetime_complete=None, params={},
                    distributions={}, user_attrs={}, system_attrs={}, intermediate_values={},
                    trial_id=row.trial_id,
                )  # fmt: skip

    for name in _RETRIED:
        method = _retried(getattr(RDBStorage, name))
        setattr(OutageRidingStorage, name, _read_only(method) if name in _READ_ONLY else method)
    # Outermost, so that a signal cannot split what the wrappers above do either.
    public = {name for name in vars(BaseStorage) if not name.startswith("_")}
    for name in sorted(public | set(_RETRIED) | {"_create_new_trial"}):
        setattr(OutageRidingStorage, name, guarded(getattr(OutageRidingStorage, name)))
    return OutageRidingStorage


def open_storage(
    url: str,
    *,
    create_schema: bool = False,
    heartbeat_s: float | None = None,
    queue_writes: bool = False,
    outage_s: float | None = DEFAULT_OUTAGE_S,
    gateway: bool = False,
) -> "optuna.storages.RDBStorage":
    """Open the RDB storage; ``create_schema`` is for the processes that set it up.

    ``heartbeat_s`` turns on Optuna's RDB heartbeat (for the supervisor, which beats for its
    workers' trials and reaps other hosts' stale ones); a trial is stale after 4 intervals.
    ``queue_writes`` (workers, on SQLite) queues transactions on a lock file: see
    ``optguard.sqlite``. Calls on the storage ride out an outage of up to ``outage_s``, then
    raise ``StorageError`` with the driver's cause, as does any other driver error; ``None``
    gives Optuna's plain storage and errors. Opening it is not retried: a storage that is
    unreachable at start is more likely a wrong URL than an outage. ``gateway`` (the
    supervisor, serving its workers' calls: ``optguard.gateway``) keeps two pooled
    connections to a database server, which every thread takes turns on, the study-wide
    lock included (``TrialSlots``).
    """
    import warnings

    import optuna
    import sqlalchemy.exc
    from optuna.exceptions import StorageInternalError

    journal = journal_path(url)
    if journal is not None:
        from optguard.journal import open_journal

        return open_journal(journal, create_schema)
    path = sqlite_path(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if path is not None:
        if create_schema and not path.parent.is_dir():
            raise StorageError(f"cannot create SQLite storage {path}: directory does not exist")
        engine_kwargs = {"connect_args": {"timeout": BUSY_TIMEOUT_S}}
    else:
        engine_kwargs["connect_args"] = _connect_args(url)
        if gateway:
            # a turn lasts one transaction; through an outage, as long as the outage may
            wait_s = 60 + (DEFAULT_OUTAGE_S if outage_s is None else outage_s)
            engine_kwargs.update(pool_size=2, max_overflow=0, pool_timeout=wait_s)
    beat = None if heartbeat_s is None else max(1, round(heartbeat_s))
    kwargs: dict[str, Any] = {
        "engine_kwargs": engine_kwargs,
        "skip_table_creation": not create_schema,
        "heartbeat_interval": beat,
        "grace_period": None if beat is None else 4 * beat,
        # with the schema lock's connection given back first (see below)
        "skip_compatibility_check": gateway,
    }
    if outage_s is None:
        cls: Any = optuna.storages.RDBStorage
    else:
        cls, kwargs["outage_s"] = _outage_storage_class(), outage_s
    try:
        with warnings.catch_warnings(), _schema_lock(url, path, create_schema):
            # heartbeat_interval is "experimental" in Optuna 5: a warning users cannot act on
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if create_schema and path is not None:
                prepare_file(path)
            storage = cls(url, **kwargs)
        if gateway:  # its two connections, the schema lock's given back
            storage._version_manager.check_table_schema_compatibility()
    except ImportError as exc:
        raise StorageURLError(f"no database driver for {mask_url(url)}: {exc}") from None
    except (sqlalchemy.exc.SQLAlchemyError, StorageInternalError) as exc:
        raise StorageError(
            f"cannot connect to storage {mask_url(url)}: {describe(exc, url)}"
        ) from None
    if path is not None:
        install_events(storage.engine, path, queue=queue_writes)
    return storage


def rdb_backend(storage: Any) -> Any:
    """``storage`` (or the one behind Optuna's cache) if it is an RDB storage: SQL,
    transactions and heartbeats, which the journal file has none of; else ``None``."""
    from optuna.storages import RDBStorage

    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, RDBStorage) else None


def is_rdb(storage: Any) -> bool:
    return rdb_backend(storage) is not None


@contextlib.contextmanager
def _schema_lock(
    url: str, path: Path | None, create_schema: bool
) -> Iterator[None]:
    """Creating the tables and version rows, one process at a time.

    Optuna checks for each table, then creates it: two first starts on an empty database
    both create, and one fails ("duplicate key", "Table 'studies' already exists"). An
    ``flock`` beside a SQLite file; a server lock on PostgreSQL and MySQL, on a connection of
    its own that is closed afterwards.
    """
    if not create_schema:
        yield
        return
    if path is not None:
        with Path(str(path) + LOCK_SUFFIX).open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield  # closing the file releases the lock
        return
    import sqlalchemy

    engine = _lock_engine(url)
    try:
        with engine.connect() as conn:
            release = _take_server_lock(conn, f"optguard-schema:{engine.url.database}")
            try:
                yield
            finally:
                with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):
                    # a connection lost meanwhile took its lock with it
                    conn.execute(release)
                    conn.commit()
    finally:
        engine.dispose()


def _lock_engine(url: Any) -> Any:
    """An engine for a server lock's connection, outside any storage's pool."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    return sqlalchemy.create_engine(url, poolclass=NullPool, connect_args=_connect_args(url))


def _connect_args(url: Any) -> dict[str, Any]:
    """psycopg waits for ever for a server by default (PyMySQL: 10 s)."""
    if str(url).startswith("postgresql") and "connect_timeout" not in str(url):
        return {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    return {}


def _take_server_lock(conn: Any, key: str) -> Any:
    """Wait for the server lock ``key`` on ``conn`` (PostgreSQL advisory lock, MySQL
    ``GET_LOCK``); returns the statement that releases it. Both die with the session."""
    from sqlalchemy import text

    if conn.dialect.name == "postgresql":
        number = zlib.crc32(key.encode())
        acquire = text("SELECT pg_advisory_lock(:k)").bindparams(k=number)
        release = text("SELECT pg_advisory_unlock(:k)").bindparams(k=number)
    else:
        # MariaDB reads a negative timeout as zero: wait in bounded steps instead.
        acquire = text("SELECT GET_LOCK(:k, 60)").bindparams(k=key[:64])
        release = text("SELECT RELEASE_LOCK(:k)").bindparams(k=key[:64])
    while conn.execute(acquire).scalar() == 0:  # 0: timed out, try again
        conn.commit()
    conn.commit()
    return release


def open_existing_study(
    study: str, storage_url: str | None, outage_s: float | None = None
) -> tuple[str, Any, int]:
    """``(url, storage, study_id)`` of a study that must already exist (stop, cancel, report).

    Raises ``UsageError`` naming the study otherwise, and never creates an empty SQLite file.
    ``outage_s`` as in ``open_storage``; by default Optuna's plain storage (the monitor
    handles its errors itself and must not wait through an outage).
    """
    url = resolve_url(storage_url)
    path = sqlite_path(url) or journal_path(url)
    if path is not None and not path.is_file():
        raise UsageError(f"no study named {study!r}: storage file {path} does not exist")
    storage = open_storage(url, outage_s=outage_s)
    try:
        return url, storage, storage.get_study_id_from_name(study)
    except KeyError:
        raise UsageError(f"no study named {study!r} in {mask_url(url)}") from None


def set_closing_attrs(
    storage: "optuna.storages.RDBStorage", trial_id: int, attrs: dict[str, Any]
) -> None:
    """User attributes of a running trial to write with the state that finishes it (the
    next ``study.tell``), in that one transaction; at once on a storage not opened by
    ``open_storage``."""
    pending = getattr(storage, "closing_attrs", None)
    if pending is None:
        set_trial_user_attrs(storage, trial_id, attrs)
    else:
        pending[trial_id] = {**pending.get(trial_id, {}), **attrs}


def set_trial_user_attrs(
    storage: "optuna.storages.RDBStorage", trial_id: int, attrs: dict[str, Any]
) -> None:
    """Several user attributes of a running trial in one transaction, retried through an
    outage (an upsert: a retry of a write that had committed changes nothing).

    ``trial.set_user_attr`` commits once per key; a worker records up to nine keys per trial,
    and on SQLite each commit takes the database's one write lock. Optuna has no public batch
    call, so this runs one upsert of all the keys (``optguard.user_attrs``).
    """
    if not attrs:
        return
    own = getattr(storage, "set_trial_user_attrs", None)
    if own is not None:  # a worker's storage through its supervisor: one call
        own(trial_id, attrs)
        return
    if not is_rdb(storage):  # the journal: one record per key, as set_user_attr writes
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial_id, key, value)
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    def write() -> None:
        with _create_scoped_session(storage.scoped_session, True) as session:
            row = models.TrialModel.find_or_raise_by_id(trial_id, session)
            storage.check_trial_is_updatable(trial_id, row.state)
            upsert_user_attrs(storage, session, trial_id, attrs)

    outage_of(storage).call(write)


class TrialSlots:
    """Hands out trials up to a study-wide total, across every worker and host.

    Counting finished plus running trials and creating the next one are one transaction
    (``optguard.ownership``), taken under one lock (a file lock beside a SQLite file, an
    advisory lock on PostgreSQL and MySQL) that reaping also holds while it fails a trial and
    enqueues its retry, so N workers never overshoot ``n_trials`` however they race. A server
    lock dies with its connection, so after an outage a claim starts over from the lock, on a
    new connection.
    """

    def __init__(self, storage: "optuna.storages.RDBStorage", study_name: str) -> None:
        self._storage = storage
        self._study_name = study_name
        self._outage = outage_of(storage)
        self._study_id = storage.get_study_id_from_name(study_name)
        self._backend = storage.engine.dialect.name if is_rdb(storage) else "journal"
        self._conn: Any = None  # the server lock's, while it is held
        self._lock_file: Any = None
        # one holder per process too: the supervisor claims for its workers from several
        # threads (``optguard.gateway``), and a flock is not exclusive between them. Taken
        # before the lock's connection, so that the pool's other is left for the holder's
        # calls. It also guards that connection, which a thread whose claim failed in an
        # outage drops (``_drop_connection``, inside or outside its hold: reentrant).
        self._threads = threading.RLock()

    @property
    def storage(self) -> "optuna.storages.RDBStorage":
        return self._storage

    @property
    def study_id(self) -> int:
        return self._study_id

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with self._threads, self._locked():
            yield

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import sqlalchemy.exc

        if self._backend in ("sqlite", "journal"):
            if self._lock_file is None:
                self._lock_file = self._lock_path().open("a")
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            return
        release = self._outage.call(self._acquire, on_retry=self._drop_connection)
        try:
            yield
        finally:
            try:
                self._conn.execute(release)
                self._conn.commit()
            except sqlalchemy.exc.SQLAlchemyError as exc:
                if not is_transient(exc):
                    raise
                self._drop_connection()  # the lock died with the lost session
            else:
                conn, self._conn = self._conn, None
                conn.close()  # back to the pool, for the storage's calls meanwhile

    def _lock_path(self) -> Path:
        """The lock file beside the SQLite or journal file."""
        if self._backend == "journal":
            file = self._storage._backend._file_path  # Optuna's JournalFileBackend
        else:
            file = self._storage.engine.url.database
        return Path(str(file) + LOCK_SUFFIX)

    def _acquire(self) -> Any:
        """Take the server lock on one of the storage's pooled connections, held until the
        lock is released. The lock holder's own calls take another: one holder per process
        (``_threads``, taken before the connection) leaves the other for them."""
        if self._conn is None:
            self._conn = self._storage.engine.connect()
        return _take_server_lock(self._conn, f"optguard:{self._study_name}")

    def _drop_connection(self) -> None:
        """Forget the lock connection (dead after an outage); the next lock opens another."""
        import sqlalchemy.exc

        with self._threads:
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):
                    conn.invalidate()  # not back to the pool: its session is gone
                    conn.close()

    def claim(
        self, study: "optuna.Study", n_trials: int | None, owner: dict[str, Any]
    ) -> "optuna.trial.Trial | None":
        """The next trial to run, created RUNNING with the ``owner`` user attributes in one
        transaction (``optguard.ownership``), or ``None`` once the study has ``n_trials``.

        An enqueued trial (a retry) still runs after the total is reached: it was owed to a
        configuration that an interruption took away.
        """
        from optguard.ownership import adopt, ask_owned

        if not is_rdb(self._storage):
            with self.lock() if n_trials is not None else contextlib.nullcontext():
                return ask_owned(study, owner, n_trials)
        claimed = self.claim_row(n_trials, owner)
        return None if claimed is None else adopt(study, *claimed)

    def claim_row(self, n_trials: int | None, owner: dict[str, Any]) -> tuple[int, Any] | None:
        """``claim`` in the storage alone, for a study held elsewhere (``optguard.gateway``
        claims here for its workers): ``(trial_id, new frozen trial or None)`` or ``None``.

        Through an outage the whole claim is retried, lock included; a retry first looks for
        a trial an attempt that lost its connection had created for ``owner`` after all.
        """
        from optguard.ownership import claim_row

        attempts = 0

        def attempt() -> tuple[int, Any] | None:
            nonlocal attempts
            attempts += 1
            with self._outage.suspended():
                with self.lock() if n_trials is not None else contextlib.nullcontext():
                    found = self._running_for(owner) if attempts > 1 else None
                    if found is not None:
                        return found, None
                    return claim_row(rdb_backend(self._storage), self._study_id, owner, n_trials)

        return self._outage.call(attempt, on_retry=self._drop_connection)

    def count_trials(self) -> int:
        """The study's trials in any state (for ``--seed``)."""
        from optguard.progress import count_trials

        return count_trials(self._storage, self._study_id)

    def give_back(self, trial_id: int, owner: dict[str, Any]) -> bool:
        """``ownership.give_back`` through an outage: a claimed trial its worker never got
        is WAITING again. Not under the study-wide lock: a claim pops WAITING trials in a
        transaction of its own, which waits for this one's row lock."""
        from optguard.ownership import give_back

        return bool(
            self._outage.call(lambda: give_back(rdb_backend(self._storage), trial_id, owner))
        )

    def _running_for(self, owner: dict[str, Any]) -> int | None:
        """A RUNNING trial with exactly ``owner``'s attributes: a worker claims its next trial
        only once its last one is finished, so such a trial is one a lost attempt created."""
        from optuna.trial import TrialState

        if not owner:
            return None
        running = self._storage.get_all_trials(
            self._study_id, deepcopy=False, states=(TrialState.RUNNING,)
        )
        for trial in running:
            if all(trial.user_attrs.get(key) == value for key, value in owner.items()):
                return int(trial._trial_id)
        return None

    def close(self) -> None:
        import sqlalchemy.exc

        with self._threads:
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):
                    conn.close()  # a connection the storage lost has nothing left to give back
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
