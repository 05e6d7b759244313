"""Storage URLs: resolved the same way by every process, and masked wherever one is shown.

The password of a URL never appears in any output, log, argv or child environment; every URL
that is printed goes through ``mask_url`` and every driver error through ``redact``.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, unquote, unquote_plus

from optguard.errors import StorageURLError

__all__ = [
    "DEFAULT_DB", "BACKENDS", "JOURNAL", "resolve_url", "mask_url", "redact", "sqlite_path",
    "journal_path",
]  # fmt: skip

DEFAULT_DB = "optguard.db"
BACKENDS = ("sqlite", "postgresql", "mysql")
# Optuna's journal file (JournalStorage + JournalFileBackend) has no URL: optguard's form is
# journal:///absolute/path or journal:relative/path.
JOURNAL = "journal:"
MASK = "***"
# Driver parameters that may carry a secret (password, sslpassword, passwd, PGPASSWORD, token,
# sslkey...). Masking a harmless one (a key file's path) costs nothing; showing a secret does.
_SECRET_KEY = re.compile(r"pass|pwd|secret|token|key|credential|auth", re.IGNORECASE)
_QUERY_ITEM = re.compile(r"(?:^|[?&;])([^=&;?]*)=([^&;]*)")
_BAD_HOST_CHARS = frozenset("@[]/?# ")  # in a parsed host: the user info was not parsed right
_URL_FORM = (
    "use dialect://user:password@host[:port]/database, percent-encoding '@', ':' and '/' in "
    "the user name or password (%40, %3A, %2F)"
)


def _parse(url: str) -> Any:
    """SQLAlchemy's URL, or ``StorageURLError`` naming the URL with no part of a password.

    SQLAlchemy takes the password up to the first ``@``: an unencoded ``@`` in it ends up in
    the host (``u:p@ss@h`` has host ``ss@h``), the port or the database name, and its error
    messages quote it. Such a URL is refused, never guessed at.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    problem = f"cannot parse storage URL {_mask_unparsed(url)!r}: {_URL_FORM}"
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: int() of a "port" like 'w0rd@host'
        raise StorageURLError(problem) from None
    if _BAD_HOST_CHARS & set(parsed.host or "") or (
        parsed.password is not None and "@" in (parsed.database or "")
    ):  # the user info ended at an "@" of the password: `u:p@ss@h` has host "ss@h"
        raise StorageURLError(problem)
    return parsed


def _is_secret(key: str) -> bool:
    return _SECRET_KEY.search(unquote_plus(key)) is not None


def _mask_query(text: str) -> str:
    """``text`` with the value of every secret-looking ``key=value`` after a ``?`` masked."""
    base, sep, query = text.partition("?")
    if not sep:
        return text
    items = []
    for item in re.split(r"([&;])", query):
        key, eq, _ = item.partition("=")
        items.append(f"{key}={MASK}" if eq and _is_secret(key) else item)
    return f"{base}?{''.join(items)}"


def _mask_unparsed(url: str) -> str:
    """A URL too broken to parse, with anything that may be a password hidden.

    The user info ends at the *last* ``@`` (a password may hold more); everything after the
    user name's first ``:`` up to there is hidden, and so are secret query values.
    """
    head, sep, rest = url.partition("://")
    if not sep:
        return _mask_query(url) if "@" not in url else url.partition(":")[0] + ":" + MASK
    creds, at, host = rest.rpartition("@")
    if not at:
        return f"{head}://{_mask_query(rest)}"
    if "?" in creds:  # that "@" may be in a query value: no part can be shown safely
        return f"{head}://{MASK}"
    user, colon, _ = creds.partition(":")
    if any(c in user for c in "/?#&="):
        user = MASK  # not a user name: the "@" was further on, in a path or query
    return f"{head}://{user}{':' + MASK if colon else ''}@{_mask_query(host)}"


def mask_url(url: str) -> str:
    """The URL with its password and secret driver parameters replaced by ``***``: the only
    form ever printed or logged."""
    if url.startswith(JOURNAL):
        return url  # a file's path: no password
    try:
        parsed = _parse(url)
    except StorageURLError:
        return _mask_unparsed(url)
    shown: str = parsed.set(query={}).render_as_string(hide_password=True)
    items = []
    for key, values in parsed.query.items():
        for value in values if isinstance(values, tuple) else (values,):
            shown_value = MASK if _is_secret(key) else quote_plus(value, errors="replace")
            items.append(f"{quote_plus(key, errors='replace')}={shown_value}")
    return f"{shown}?{'&'.join(items)}" if items else shown


def _secrets(url: str) -> set[str]:
    """Every password the URL may hold: its user info's and its secret query values.

    For an unparseable URL each reading counts (the user info ending at any ``@``).
    """
    found = {value for key, value in _QUERY_ITEM.findall(url) if _is_secret(key)}
    try:
        parsed = _parse(url)
    except StorageURLError:
        rest = url.partition("://")[2] or url.partition(":")[2]
        found |= {rest[:at].partition(":")[2] for at, c in enumerate(rest) if c == "@"}
    else:
        if parsed.password:
            found.add(str(parsed.password))
    return {unquote_plus(s) for s in found} | {unquote(s) for s in found} | found


def _any_encoding(secret: str) -> str:
    """A regex matching ``secret`` with any of its characters percent-encoded (or a space
    as ``+``), as written in the URL or as a driver echoes it."""
    parts = []
    for char in secret:
        encoded = char.encode("utf-8", "surrogatepass")  # argv may hold undecodable bytes
        forms = [re.escape(char), "".join(f"%{b:02x}" for b in encoded)]
        parts.append("(?:" + "|".join(forms + (["\\+"] if char == " " else [])) + ")")
    return "".join(parts)


def redact(text: str, url: str) -> str:
    """``text`` with every password of the URL removed (driver errors sometimes echo it)."""
    for secret in sorted(_secrets(url), key=len, reverse=True):
        if secret:
            text = re.sub(_any_encoding(secret), MASK, text, flags=re.IGNORECASE)
    return text


def resolve_url(url: str | None) -> str:
    """The storage URL workers will use: the embedded SQLite file by default.

    A relative SQLite path is made absolute so every worker opens the same file. ``mysql://``
    uses PyMySQL when the C driver is not installed.
    """
    if url is None:
        return f"sqlite:///{Path(DEFAULT_DB).resolve()}"
    if url.startswith(JOURNAL):
        path = url[len(JOURNAL):]
        path = "/" + path.lstrip("/") if path.startswith("//") else path
        if not path:
            raise StorageURLError(
                f"no file in storage URL {url!r}: use journal:///absolute/path or journal:file"
            )
        return f"{JOURNAL}//{Path(path).resolve()}"
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


def journal_path(url: str) -> Path | None:
    """The file of a ``journal:`` storage URL (as ``resolve_url`` writes it), else ``None``."""
    if not url.startswith(JOURNAL):
        return None
    path = url[len(JOURNAL):]
    return Path("/" + path.lstrip("/") if path.startswith("//") else path)


def sqlite_path(url: str) -> Path | None:
    if url.startswith(JOURNAL):
        return None
    parsed = _parse(url)
    return Path(parsed.database) if parsed.get_backend_name() == "sqlite" else None
