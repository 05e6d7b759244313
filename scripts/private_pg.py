"""A private PostgreSQL server for scale tests and benchmarks.

The shared server on 5432 has its own ``max_connections`` and other clients; a test that
counts connections or hits the connection limit on purpose needs a server of its own:

    with private_postgres(max_connections=20) as url:   # postgresql+psycopg://...:PORT/optguard
        ...
        peak = ConnectionSampler(url) ...

``initdb`` runs in a temporary directory (as the OS user ``postgres`` when we are root: the
server refuses to run as root), trust authentication, 127.0.0.1 on a free port, durability off
(fsync, synchronous_commit, full_page_writes: a scratch server is faster without it) and
``pg_stat_statements`` preloaded so that the database round trips of a run can be counted. On
exit it is stopped (``pg_ctl stop -m immediate``) and its directory removed, also on error.

The probes (:func:`connections`, :func:`statement_calls`, :func:`transactions`) connect to the
server's ``postgres`` database and count the target database of the URL only, so that their own
queries stay out of the numbers.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

PG_ROOT = Path("/usr/lib/postgresql")
OS_USER = "postgres"
START_TIMEOUT_S = 60
FAST_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_preload_libraries": "'pg_stat_statements'",
    "pg_stat_statements.track": "all",
    "listen_addresses": "'127.0.0.1'",
    "log_min_messages": "warning",
}


# A client's line about a connection it could not make or lost: PostgreSQL's own refusal
# ("sorry, too many clients already", "remaining connection slots are reserved"), the driver's
# exception name, optguard's outage warning ("storage ... unreachable").
CONNECTION_ERROR = re.compile(
    r"too many clients|remaining connection slots|OperationalError|could not connect"
    r"|connection refused|connection failed|server closed the connection|unreachable",
    re.IGNORECASE,
)


class PrivatePostgresError(RuntimeError):
    """The private server could not be set up (no binaries, initdb or start failed)."""


def pg_bin_dir(root: Path = PG_ROOT) -> Path:
    """The ``bin`` directory of the newest PostgreSQL under ``root`` (Debian's layout,
    ``/usr/lib/postgresql/<version>/bin``), found at run time so no version is hard-coded."""
    found = []
    for version_dir in root.glob("*"):
        try:
            version = float(version_dir.name)
        except ValueError:
            continue
        if (version_dir / "bin" / "initdb").is_file():
            found.append((version, version_dir / "bin"))
    if not found:
        raise PrivatePostgresError(f"no PostgreSQL server binaries (initdb) under {root}")
    return max(found)[1]


def available() -> bool:
    """Whether :func:`private_postgres` can run here (binaries present, and the ``postgres``
    OS user when running as root): tests skip otherwise."""
    try:
        pg_bin_dir()
    except PrivatePostgresError:
        return False
    if os.geteuid() != 0:
        return True
    try:
        import pwd

        pwd.getpwnam(OS_USER)
    except KeyError:
        return False
    return shutil.which("runuser") is not None


def free_port() -> int:
    """A port nobody listens on now (the kernel's pick); :func:`private_postgres` retries with
    another if someone takes it before the server binds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_server_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", OS_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], what: str) -> None:
    result = subprocess.run(_as_server_user(cmd), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise PrivatePostgresError(f"{what} failed ({result.returncode}): {result.stderr[-2000:]}")


def _conf_value(value: object) -> str:
    """A postgresql.conf value: numbers and already quoted strings as they are, text quoted."""
    text = str(value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)) or text.startswith("'") or text in ("on", "off"):
        return text
    return "'" + text.replace("'", "''") + "'"


@contextlib.contextmanager
def private_postgres(
    max_connections: int = 30,
    settings: Mapping[str, object] | None = None,
    idle_in_transaction_session_timeout: str | None = None,
    database: str = "optguard",
) -> Iterator[str]:
    """Start a private server; yield the SQLAlchemy URL of ``database`` on it (created
    empty, with ``pg_stat_statements`` installed). ``settings`` override or add
    postgresql.conf lines. The server is stopped and its files removed on exit."""
    bin_dir = pg_bin_dir()
    tmp = Path(tempfile.mkdtemp(prefix="optguard-pg-"))
    data = tmp / "data"
    try:
        if os.geteuid() == 0:
            shutil.chown(tmp, OS_USER, OS_USER)
        _run([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
              "-E", "UTF8", "--no-sync", "--no-instructions"], "initdb")  # fmt: skip
        conf: dict[str, object] = {**FAST_SETTINGS, "max_connections": max_connections,
                                   "unix_socket_directories": f"'{tmp}'"}  # fmt: skip
        if idle_in_transaction_session_timeout is not None:
            conf["idle_in_transaction_session_timeout"] = idle_in_transaction_session_timeout
        conf.update(settings or {})
        port = _start(bin_dir, data, tmp / "server.log", conf)
        try:
            admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
            _execute(admin, f'CREATE DATABASE "{database}"')
            _execute(admin, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")  # probes' view
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}"
        finally:
            subprocess.run(
                _as_server_user([str(bin_dir / "pg_ctl"), "stop", "-D", str(data), "-m",
                                 "immediate", "-w"]),
                capture_output=True, check=False, timeout=60,
            )  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _start(bin_dir: Path, data: Path, log: Path, conf: Mapping[str, object]) -> int:
    """``pg_ctl start`` on a free port (a few tries: a port can be taken between the pick and
    the bind); the port it listens on."""
    base = (data / "postgresql.conf").read_text()
    last = ""
    for _ in range(5):
        port = free_port()
        lines = [f"{k} = {_conf_value(v)}" for k, v in {**conf, "port": port}.items()]
        (data / "postgresql.conf").write_text(base + "\n# private_pg\n" + "\n".join(lines) + "\n")
        result = subprocess.run(
            _as_server_user([str(bin_dir / "pg_ctl"), "start", "-D", str(data), "-l", str(log),
                             "-w", "-t", str(START_TIMEOUT_S)]),
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode == 0:
            return port
        last = log.read_text()[-2000:] if log.exists() else result.stderr
        if "could not bind" not in last and "already in use" not in last:
            break
    raise PrivatePostgresError(f"pg_ctl start failed: {last}")


# -- probes ------------------------------------------------------------------------------------


def libpq_url(url: str, database: str | None = None) -> str:
    """A libpq URI for psycopg from an SQLAlchemy URL (``+psycopg`` dropped), optionally
    pointing at another database of the same server."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    path = f"/{database}" if database is not None else parts.path
    return urlunsplit((scheme, parts.netloc, path, parts.query, parts.fragment))


def database_of(url: str) -> str:
    return urlsplit(url).path.lstrip("/") or "postgres"


def _execute(url: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]  # our own literal statements


@dataclass(frozen=True)
class Connection:
    """One client backend, as ``pg_stat_activity`` shows it."""

    state: str  # active, idle, idle in transaction, ... ("" when null)
    seconds_in_state: float
    query: str
    database: str
    client_port: int  # -1 for a Unix socket


class Probe:
    """One autocommit connection to the server's ``postgres`` database that reads the
    statistics views about the URL's database; reused by :class:`ConnectionSampler` so that
    sampling 20 times a second does not open 20 connections a second."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.database = database_of(url)
        self._conn = psycopg.connect(libpq_url(url, "postgres"), autocommit=True)
        self._has_statements = False

    def _statements_view(self) -> None:
        """``pg_stat_statements`` is a view of an extension: create it once, where missing
        (a server not started by :func:`private_postgres`; it must preload the library)."""
        if not self._has_statements:
            self._conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            self._has_statements = True

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connections(self, all_databases: bool = True) -> list[Connection]:
        """Client backends other than this probe's own (of every database, or only the URL's)."""
        rows = self._conn.execute(
            "SELECT coalesce(state, ''), "
            "coalesce(extract(epoch FROM clock_timestamp() - state_change), 0)::float8, "
            "coalesce(query, ''), coalesce(datname, ''), coalesce(client_port, -1) "
            "FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
            "AND (%s OR datname = %s)",
            (all_databases, self.database),
        ).fetchall()
        return [Connection(*row) for row in rows]

    def statement_calls(self) -> int:
        """Statements executed in the URL's database so far (``pg_stat_statements``)."""
        self._statements_view()
        row = self._conn.execute(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s",
            (self.database,),
        ).fetchone()
        return int(row[0]) if row else 0

    def statements(self, top: int = 10) -> list[tuple[int, str]]:
        """The ``top`` statements by calls in the URL's database: what a trial costs, by query."""
        self._statements_view()
        rows = self._conn.execute(
            "SELECT calls, query FROM pg_stat_statements s JOIN pg_database d "
            "ON d.oid = s.dbid WHERE d.datname = %s ORDER BY calls DESC LIMIT %s",
            (self.database, top),
        ).fetchall()
        return [(int(calls), str(query)) for calls, query in rows]

    def transactions(self) -> int:
        """Commits plus rollbacks in the URL's database (``pg_stat_database``; a backend's
        counts reach it when its transaction ends or, at the latest, when it exits)."""
        self._conn.execute("SELECT pg_stat_clear_snapshot()")
        row = self._conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
            (self.database,),
        ).fetchone()
        return int(row[0]) if row else 0

    def reset_statements(self) -> None:
        self._statements_view()
        self._conn.execute("SELECT pg_stat_statements_reset()")


def connections(url: str) -> list[tuple[str, float, str]]:
    """(state, seconds in that state, query) of every client backend other than the caller."""
    with Probe(url) as probe:
        return [(c.state, c.seconds_in_state, c.query) for c in probe.connections()]


def statement_calls(url: str) -> int:
    with Probe(url) as probe:
        return probe.statement_calls()


def transactions(url: str) -> int:
    with Probe(url) as probe:
        return probe.transactions()


def reset_statements(url: str) -> None:
    with Probe(url) as probe:
        probe.reset_statements()


@dataclass
class SamplerResult:
    """What :class:`ConnectionSampler` saw: peaks, not averages, since a limit is a peak."""

    samples: int = 0
    peak_total: int = 0
    peak_by_state: dict[str, int] = field(default_factory=dict)
    longest_idle_in_transaction_s: float = 0.0
    longest_idle_in_transaction_query: str = ""
    peak_by_group: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "peak_total": self.peak_total,
            "peak_by_state": dict(sorted(self.peak_by_state.items())),
            "longest_idle_in_transaction_s": round(self.longest_idle_in_transaction_s, 3),
            "longest_idle_in_transaction_query": self.longest_idle_in_transaction_query[:200],
            "peak_by_group": dict(sorted(self.peak_by_group.items())),
            "errors": self.errors[:5],
        }


class ConnectionSampler:
    """Samples ``pg_stat_activity`` in a thread every ``interval_s`` while in its ``with``:
    the peak number of client connections to the URL's database (with ``all_databases``, to
    any: the probes' own, on ``postgres``, then count too), the peak per state, and the
    longest time a connection sat ``idle in transaction``. A sample that fails is recorded,
    not raised: the sampler's connection is opened first, so a full server does not refuse it."""

    def __init__(
        self, url: str, interval_s: float = 0.05, all_databases: bool = False,
        group_of: Callable[[int], str | None] | None = None, group_every: int = 5,
    ) -> None:  # fmt: skip
        """``group_of`` names the group (a host) of a client's pid: every ``group_every``
        samples the connections are traced to their processes (the clients run here) and
        the peak per group is kept too, so a host's own count is seen even when the total
        is capped by the server."""
        self.url = url
        self.interval_s = interval_s
        self.all_databases = all_databases
        self.group_of = group_of
        self.group_every = group_every
        self.result = SamplerResult()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pg-sampler", daemon=True)
        self._probe: Probe | None = None

    def __enter__(self) -> ConnectionSampler:
        self._probe = Probe(self.url)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._probe is not None:
            self._probe.close()

    def _loop(self) -> None:
        import psycopg

        r, probe = self.result, self._probe
        while probe is not None and not self._stop.is_set():
            try:
                conns = probe.connections(self.all_databases)
            except psycopg.Error as exc:
                r.errors.append(f"{type(exc).__name__}: {exc}".strip())
                self._stop.wait(self.interval_s)
                continue
            r.samples += 1
            r.peak_total = max(r.peak_total, len(conns))
            if self.group_of is not None and r.samples % self.group_every == 1:
                owners = socket_owners({c.client_port for c in conns})
                groups = Counter(self.group_of(pid) for pid in owners.values())
                for name, n in groups.items():
                    if name is not None:
                        r.peak_by_group[name] = max(r.peak_by_group.get(name, 0), n)
            for state, n in Counter(c.state for c in conns).items():
                r.peak_by_state[state] = max(r.peak_by_state.get(state, 0), n)
            for c in conns:
                if c.state == "idle in transaction" and c.seconds_in_state > (
                    r.longest_idle_in_transaction_s
                ):
                    r.longest_idle_in_transaction_s = c.seconds_in_state
                    r.longest_idle_in_transaction_query = c.query
            self._stop.wait(self.interval_s)



def connection_errors(paths: Iterable[Path], limit: int | None = None) -> list[str]:
    """Lines of these files (a run's stderr, its worker logs) that match
    :data:`CONNECTION_ERROR`, as ``file: line``; at most ``limit`` (all by default)."""
    found: list[str] = []
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if CONNECTION_ERROR.search(line):
                found.append(f"{path.name}: {line.strip()[:300]}")
                if limit is not None and len(found) >= limit:
                    return found
    return found


def query(url: str, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of one read on the URL's database, in a connection of its own closed at once
    (no pool left behind to count among the connections being measured)."""
    import psycopg

    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]  # caller's SQL


def socket_owners(ports: set[int]) -> dict[int, int]:
    """Local TCP port -> pid of the process of this machine holding that socket (psutil;
    other users' processes need root)."""
    import psutil

    owners: dict[int, int] = {}
    try:
        found = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return owners
    for conn in found:
        if conn.laddr and conn.laddr.port in ports and conn.pid is not None:
            owners[conn.laddr.port] = conn.pid
    return owners


def as_host(name: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run as another "host": in a UTS namespace of its own with hostname ``name``
    (so ``optguard.worker`` reads ``name:pid``, as on a real node); ``sh`` execs it, so the
    process started becomes ``argv`` itself (needs root)."""
    return ["unshare", "-u", "sh", "-c", f"hostname {shlex.quote(name)} && exec {shlex.join(argv)}"]


def uts_namespace(pid: int) -> str | None:
    """The UTS namespace of a process (``uts:[inode]``): what tells the "hosts" that run
    here in namespaces of their own apart; ``None`` once it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/uts")
    except OSError:
        return None


def namespace_groups(roots: Mapping[str, int]) -> Callable[[int], str | None]:
    """``group_of`` for :class:`ConnectionSampler`: a pid's host is the name in ``roots``
    (name -> pid of the host's first process) whose UTS namespace it shares; ``None`` for a
    process in ours (a root that has not yet entered its own namespace is not matched)."""
    mine = uts_namespace(os.getpid())

    def group_of(pid: int) -> str | None:
        ns = uts_namespace(pid)
        if ns is None or ns == mine:
            return None
        for name, root in list(roots.items()):
            if uts_namespace(root) == ns:
                return name
        return None

    return group_of
