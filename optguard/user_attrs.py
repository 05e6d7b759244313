"""Several user attributes of one trial in one statement.

optguard writes four or five ``optguard.*`` attributes at a trial's claim and at its finish.
Optuna's ``_set_trial_attr_without_commit`` is two statements per key (it reads the trial
again, then upserts), so a finish cost ten round trips where one does: on a database server
each is a network round trip, and under the gateway each is the supervisor's CPU for all of
its host's workers. The caller's transaction has already read the trial and checked that it
may be updated (the finish locks its row; a claim has just set it RUNNING).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

__all__ = ["upsert_user_attrs"]


def upsert_user_attrs(backend: Any, session: Any, trial_id: int, attrs: dict[str, Any]) -> None:
    """Insert or overwrite ``attrs`` on trial ``trial_id`` in ``session``'s transaction:
    one multi-row upsert on PostgreSQL, MySQL and SQLite 3.24+, else Optuna's per key."""
    from optuna.storages._rdb import models

    if not attrs:
        return
    model = models.TrialUserAttributeModel
    rows = [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]
    dialect = backend.engine.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt = pg_insert(model).values(rows)
        stmt = stmt.on_conflict_do_update(
            index_elements=[model.trial_id, model.key],
            set_={"value_json": stmt.excluded.value_json},
        )
    elif dialect == "sqlite" and sqlite3.sqlite_version_info >= (3, 24, 0):
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(model).values(rows)
        stmt = stmt.on_conflict_do_update(
            index_elements=[model.trial_id, model.key],
            set_={"value_json": stmt.excluded.value_json},
        )
    elif dialect == "mysql":
        from sqlalchemy.dialects.mysql import insert as mysql_insert

        stmt = mysql_insert(model).values(rows)
        stmt = stmt.on_duplicate_key_update(value_json=stmt.inserted.value_json)
    else:
        for key, value in attrs.items():
            backend._set_trial_attr_without_commit(session, model, trial_id, key, value)
        return
    session.execute(stmt)
