"""Opening the study's storage, safely shared by many worker processes and hosts.

SQLite is the embedded default and needs care to be shared by concurrent processes (see
``optguard.sqlite``), with the schema created once by the parent before workers start.
PostgreSQL and MySQL need nothing special.
"""

from __future__ import annotations

import contextlib
import fcntl
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from optguard.errors import StorageError, StorageURLError, UsageError
from optguard.sqlite import BUSY_TIMEOUT_S, install_events, prepare_file
from optguard.urls import DEFAULT_DB, mask_url, redact, resolve_url, sqlite_path

if TYPE_CHECKING:
    import optuna

__all__ = [
    "DEFAULT_DB",
    "resolve_url",
    "mask_url",
    "redact",
    "open_storage",
    "open_existing_study",
    "TrialSlots",
    "set_trial_user_attrs",
]


def open_storage(
    url: str,
    *,
    create_schema: bool = False,
    heartbeat_s: float | None = None,
    queue_writes: bool = False,
) -> "optuna.storages.RDBStorage":
    """Open the RDB storage; ``create_schema`` is for the one process that sets it up.

    ``heartbeat_s`` turns on Optuna's RDB heartbeat (for the supervisor, which beats for its
    workers' trials and reaps other hosts' stale ones); a trial is stale after 4 intervals.
    ``queue_writes`` (workers, on SQLite) queues transactions on a lock file: see
    ``optguard.sqlite``.
    """
    import warnings

    import optuna
    import sqlalchemy.exc

    path = sqlite_path(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if path is not None:
        if create_schema:
            prepare_file(path)
        engine_kwargs = {"connect_args": {"timeout": BUSY_TIMEOUT_S}}
    beat = None if heartbeat_s is None else max(1, round(heartbeat_s))
    try:
        with warnings.catch_warnings():
            # heartbeat_interval is "experimental" in Optuna 5: a warning users cannot act on
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                skip_table_creation=not create_schema,
                heartbeat_interval=beat,
                grace_period=None if beat is None else 4 * beat,
            )
    except ImportError as exc:
        raise StorageURLError(f"no database driver for {mask_url(url)}: {exc}") from None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        reason = redact(detail[0] if detail else type(exc).__name__, url)
        raise StorageError(f"cannot connect to storage {mask_url(url)}: {reason}") from None
    if path is not None:
        install_events(storage.engine, path, queue=queue_writes)
    return storage


def open_existing_study(study: str, storage_url: str | None) -> tuple[str, Any, int]:
    """``(url, storage, study_id)`` of a study that must already exist (stop, cancel, report).

    Raises ``UsageError`` naming the study otherwise, and never creates an empty SQLite file.
    """
    url = resolve_url(storage_url)
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise UsageError(f"no study named {study!r}: storage file {path} does not exist")
    storage = open_storage(url)
    try:
        return url, storage, storage.get_study_id_from_name(study)
    except KeyError:
        raise UsageError(f"no study named {study!r} in {mask_url(url)}") from None


def set_trial_user_attrs(
    storage: "optuna.storages.RDBStorage", trial_id: int, attrs: dict[str, Any]
) -> None:
    """Several user attributes of a running trial in one transaction.

    ``trial.set_user_attr`` commits once per key; a worker records up to nine keys per trial,
    and on SQLite each commit takes the database's one write lock. Optuna has no public batch
    call, so this runs its own per-key upsert inside one session.
    """
    if not attrs:
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(storage.scoped_session, True) as session:
        for key, value in attrs.items():
            storage._set_trial_attr_without_commit(
                session, models.TrialUserAttributeModel, trial_id, key, value
            )


class TrialSlots:
    """Hands out trials up to a study-wide total, across every worker and host.

    Counting finished plus running trials and creating the next one happen under one lock
    (a file lock beside a SQLite file, an advisory lock on PostgreSQL and MySQL), so N
    workers never overshoot ``n_trials`` however they race.
    """

    def __init__(self, storage: "optuna.storages.RDBStorage", study_name: str) -> None:
        self._storage = storage
        self._study_name = study_name
        self._study_id = storage.get_study_id_from_name(study_name)
        self._backend = storage.engine.dialect.name
        self._conn: Any = None
        self._lock_file: Any = None

    @property
    def storage(self) -> "optuna.storages.RDBStorage":
        return self._storage

    @property
    def study_id(self) -> int:
        return self._study_id

    def count(self, waiting: bool = False) -> int:
        """Trials that count toward the total: finished (complete, pruned, failed) or running;
        with ``waiting``, the enqueued ones instead."""
        from optuna.storages._rdb import models
        from optuna.trial import TrialState
        from sqlalchemy import func, select

        states = (
            (TrialState.WAITING,)
            if waiting
            else (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        )
        stmt = (
            select(func.count())
            .select_from(models.TrialModel)
            .where(models.TrialModel.study_id == self._study_id, models.TrialModel.state.in_(states))
        )
        with self._storage.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        from sqlalchemy import text

        key = f"optguard:{self._study_name}"
        if self._backend == "sqlite":
            if self._lock_file is None:
                path = Path(str(self._storage.engine.url.database) + ".optguard-lock")
                self._lock_file = path.open("a")
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            return
        if self._conn is None:
            self._conn = self._storage.engine.connect()
        if self._backend == "postgresql":
            acquire = text("SELECT pg_advisory_lock(:k)").bindparams(k=zlib.crc32(key.encode()))
            release = text("SELECT pg_advisory_unlock(:k)").bindparams(k=zlib.crc32(key.encode()))
        else:
            # MariaDB reads a negative timeout as zero: wait in bounded steps instead.
            acquire = text("SELECT GET_LOCK(:k, 60)").bindparams(k=key[:64])
            release = text("SELECT RELEASE_LOCK(:k)").bindparams(k=key[:64])
        while self._conn.execute(acquire).scalar() == 0:  # 0: timed out, try again
            self._conn.commit()
        self._conn.commit()
        try:
            yield
        finally:
            self._conn.execute(release)
            self._conn.commit()

    def claim(
        self, study: "optuna.Study", n_trials: int | None, owner: dict[str, Any]
    ) -> "optuna.trial.Trial | None":
        """The next trial to run, created RUNNING with the ``owner`` user attributes in one
        transaction (``optguard.ownership``), or ``None`` once the study has ``n_trials``.

        An enqueued trial (a retry) still runs after the total is reached: it was owed to a
        configuration that an interruption took away.
        """
        from optguard.ownership import ask_owned

        if n_trials is None:
            return ask_owned(study, owner)
        with self.lock():
            if self.count() >= n_trials and not self.count(waiting=True):
                return None
            return ask_owned(study, owner)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
