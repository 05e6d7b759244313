"""Storage URLs: resolved the same way by every process, and masked wherever one is shown.

The password of a URL never appears in any output, log, argv or child environment; every URL
that is printed goes through ``mask_url`` and every driver error through ``redact``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from optguard.errors import StorageURLError

__all__ = ["DEFAULT_DB", "BACKENDS", "resolve_url", "mask_url", "redact", "sqlite_path"]

DEFAULT_DB = "optguard.db"
BACKENDS = ("sqlite", "postgresql", "mysql")


def _parse(url: str) -> Any:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except ArgumentError:
        raise StorageURLError(f"cannot parse storage URL {_mask_unparsed(url)!r}") from None


def _mask_unparsed(url: str) -> str:
    """Hide anything between ``://user:`` and ``@`` in a URL too broken to parse."""
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{head}://{user}:***@{host}" if ":" in creds else url


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***``: the only form ever printed or logged."""
    try:
        return _parse(url).render_as_string(hide_password=True)
    except StorageURLError:
        return _mask_unparsed(url)


def redact(text: str, url: str) -> str:
    """``text`` with the URL's password removed (driver errors sometimes echo it)."""
    try:
        password = _parse(url).password
    except StorageURLError:
        return text
    return text.replace(str(password), "***") if password else text


def resolve_url(url: str | None) -> str:
    """The storage URL workers will use: the embedded SQLite file by default.

    A relative SQLite path is made absolute so every worker opens the same file. ``mysql://``
    uses PyMySQL when the C driver is not installed.
    """
    if url is None:
        return f"sqlite:///{Path(DEFAULT_DB).resolve()}"
    parsed = _parse(url)
    backend = parsed.get_backend_name()
    if backend not in BACKENDS:
        raise StorageURLError(
            f"unsupported storage backend {backend!r} in {mask_url(url)} "
            f"(use {', '.join(BACKENDS)})"
        )
    if backend == "sqlite":
        database = parsed.database
        if not database or database == ":memory:":
            raise StorageURLError("an in-memory SQLite storage cannot be shared by workers")
        parsed = parsed.set(database=str(Path(database).resolve()))
    if parsed.drivername == "mysql" and importlib.util.find_spec("MySQLdb") is None:
        parsed = parsed.set(drivername="mysql+pymysql")
    return parsed.render_as_string(hide_password=False)


def sqlite_path(url: str) -> Path | None:
    parsed = _parse(url)
    return Path(parsed.database) if parsed.get_backend_name() == "sqlite" else None
