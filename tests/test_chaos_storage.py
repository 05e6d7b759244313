"""The storage misbehaves under a running study: concurrent first starts, an outage, a full disk
(issue 10, cases 6, 12 and 13).

Real servers and real processes: a fresh database on the shared PostgreSQL and MariaDB, a
private PostgreSQL this module starts, stops and restarts, a real 3 MB tmpfs that fills up.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import optuna
import pytest
import sqlalchemy
from conftest import MYSQL_URL, PG_URL, load_trials, objective, sqlite_url
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from sqlalchemy.pool import NullPool

pytestmark = pytest.mark.scenario

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SHORT = """
import time


def objective(trial):
    x = trial.suggest_float("x", -1.0, 1.0)
    time.sleep(0.2)
    return x * x
"""
FILLS_DISK = """
import os


def objective(trial):
    x = trial.suggest_float("x", -1.0, 1.0)
    if trial.number == 3 and "BALLAST" in os.environ:  # fill the disk the storage is on
        with open(os.environ["BALLAST"], "ab", buffering=0) as fh:
            try:
                while True:
                    fh.write(b"x" * 4096)
            except OSError:
                pass  # ENOSPC: the disk is full now
    return x * x
"""


def _start(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "optguard", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 180) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def _states(url: str, study: str) -> list[TrialState]:
    return [t.state for t in load_trials(url, study)]


# -- 6: concurrent first starts --------------------------------------------------------------


@pytest.fixture(params=["postgresql", "mysql"])
def fresh_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """A new, empty database on the shared server, dropped afterwards."""
    base = PG_URL if request.param == "postgresql" else MYSQL_URL
    name = f"og_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    try:
        yield sqlalchemy.make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        force = " WITH (FORCE)" if request.param == "postgresql" else ""
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name}{force}"))
        admin.dispose()


def test_three_runs_start_at_once_on_a_fresh_server_database(
    tmp_path: Path, study_name: str, fresh_database: str
) -> None:
    runs = []
    for i in range(3):
        cwd = tmp_path / str(i)
        cwd.mkdir()
        runs.append(_start(
            "run", "--study", study_name, "--objective", objective("fast.py:objective"),
            "--n-trials", "12", "--workers", "2", "--pruner", "none",
            "--storage", fresh_database, cwd=cwd,
        ))  # fmt: skip
    for code, _, err in [_finish(run) for run in runs]:
        assert code == 0, err
    assert _states(fresh_database, study_name) == [TrialState.COMPLETE] * 12


def test_three_studies_start_at_once_in_a_directory_without_a_database(tmp_path: Path) -> None:
    names = [f"s{i}" for i in range(3)]
    runs = [
        _start(
            "run", "--study", name, "--objective", objective("fast.py:objective"),
            "--n-trials", "5", "--workers", "2", "--pruner", "none", cwd=tmp_path,
        )  # fmt: skip
        for name in names
    ]
    for code, _, err in [_finish(run) for run in runs]:
        assert code == 0, err
    for name in names:
        assert _states(sqlite_url(tmp_path), name) == [TrialState.COMPLETE] * 5


# -- 12: a database outage -------------------------------------------------------------------


class PrivatePostgres:
    """A PostgreSQL server of this test module alone: the shared one is never restarted."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.data = root / "data"
        self.url = f"postgresql://postgres:pw-s3cret@127.0.0.1:{port}/test"

    def _pg(self, *args: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(PG_BIN / args[0]), *args[1:]],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip

    def init(self) -> None:
        self.data.mkdir()
        shutil.chown(self.root, "postgres")
        shutil.chown(self.data, "postgres")
        self._pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()
        self._pg("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "test")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", options,
            "-w", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    if not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL 15 binaries not installed")
    root = Path(tempfile.mkdtemp(prefix="optguard-pg-"))
    root.chmod(0o755)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = PrivatePostgres(root, port)
    try:
        server.init()
        yield server
    finally:
        if server.running():
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def _finished(url: str, study: str) -> int:
    """Finished trials of the study, or -1 while it cannot be read."""
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    query = sqlalchemy.text(
        "SELECT count(*) FROM trials JOIN studies USING (study_id) "
        "WHERE study_name = :s AND trials.state IN ('COMPLETE', 'PRUNED', 'FAIL')"
    )
    try:
        with engine.connect() as conn:
            return int(conn.execute(query, {"s": study}).scalar_one())
    except sqlalchemy.exc.SQLAlchemyError:
        return -1  # not created yet
    finally:
        engine.dispose()


def _wait_finished(url: str, study: str, count: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while _finished(url, study) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never got going"
        time.sleep(0.05)


def test_run_rides_out_a_postgres_restart(
    tmp_path: Path, study_name: str, private_pg: PrivatePostgres
) -> None:
    (tmp_path / "short.py").write_text(SHORT)
    run = _start(
        "run", "--study", study_name, "--objective", f"{tmp_path / 'short.py'}:objective",
        "--n-trials", "30", "--workers", "2", "--pruner", "none",
        "--storage", private_pg.url, cwd=tmp_path,
    )  # fmt: skip
    try:
        _wait_finished(private_pg.url, study_name, 6, run)
        private_pg.stop("fast")  # every connection is terminated, new ones refused
        time.sleep(2.5)
    finally:
        if not private_pg.running():
            private_pg.start()
    code, out, err = _finish(run)
    assert code == 0, err
    states = _states(private_pg.url, study_name)
    assert len(states) == 30 and set(states) == {TrialState.COMPLETE}, states
    assert "exceeding max length" not in out + err


def test_run_ends_with_the_real_cause_past_the_outage_bound(
    tmp_path: Path, study_name: str, private_pg: PrivatePostgres
) -> None:
    (tmp_path / "short.py").write_text(SHORT)
    run = _start(
        "run", "--study", study_name, "--objective", f"{tmp_path / 'short.py'}:objective",
        "--n-trials", "1000", "--workers", "2", "--pruner", "none", "--storage-outage", "3s",
        "--storage", private_pg.url, cwd=tmp_path,
    )  # fmt: skip
    try:
        _wait_finished(private_pg.url, study_name, 4, run)
        private_pg.stop("fast")
        code, out, err = _finish(run, timeout=60)
    finally:
        if not private_pg.running():
            private_pg.start()
    assert code == 3, err
    assert f"postgres:***@127.0.0.1:{private_pg.port}/test unreachable for 3s" in err, err
    assert "Connection refused" in err or "shutting down" in err, err
    assert "exceeding max length" not in out + err and "Traceback" not in err
    assert "pw-s3cret" not in out + err
    # the restarted server still has the study; the next run finishes what was left RUNNING
    rerun = _start(
        "run", "--study", study_name, "--objective", f"{tmp_path / 'short.py'}:objective",
        "--n-trials", "12", "--workers", "2", "--pruner", "none",
        "--storage", private_pg.url, cwd=tmp_path,
    )  # fmt: skip
    code, _, err = _finish(rerun)
    assert code == 0, err
    assert TrialState.RUNNING not in _states(private_pg.url, study_name)


# -- 13: a full disk under SQLite -------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 3 MB filesystem (tmpfs), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_disk_ends_the_run_with_the_cause_and_a_rerun_completes(
    tmp_path: Path, study_name: str, small_disk: Path
) -> None:
    (tmp_path / "fills.py").write_text(FILLS_DISK)
    ballast = small_disk / "ballast"
    args = (
        "run", "--study", study_name, "--objective", f"{tmp_path / 'fills.py'}:objective",
        "--n-trials", "10", "--workers", "2", "--pruner", "none",
    )  # fmt: skip
    env = {"BALLAST": str(ballast)}
    code, out, err = _finish(_start(*args, cwd=small_disk, env=env), timeout=120)
    assert code == 3, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "database or disk is full" in lines[0], err
    assert "exceeding max length" not in err
    # the write-ahead log's space was given back: the trials the full disk interrupted could
    # be marked failed, so none is left RUNNING
    assert TrialState.RUNNING not in _states(sqlite_url(small_disk), study_name)
    ballast.unlink()  # space again: the same command resumes the study
    code, out, err = _finish(_start(*args, cwd=small_disk), timeout=120)
    assert code == 0, (out, err)
    states = _states(sqlite_url(small_disk), study_name)
    assert len(states) == 10 and TrialState.RUNNING not in states, states
    assert TrialState.WAITING not in states


def test_full_disk_under_a_journal_file_is_a_storage_error_and_a_rerun_completes(
    tmp_path: Path, study_name: str, small_disk: Path
) -> None:
    """Optuna's journal on a full disk: one line, exit 3 (not workers dying in a loop); a
    record the full disk cut short is refused with how to cut it off, then the run resumes."""
    (tmp_path / "fills.py").write_text(FILLS_DISK)
    ballast = small_disk / "ballast"
    args = (
        "run", "--study", study_name, "--objective", f"{tmp_path / 'fills.py'}:objective",
        "--n-trials", "10", "--workers", "2", "--pruner", "none", "--storage", "journal:j.log",
    )  # fmt: skip
    code, out, err = _finish(_start(*args, cwd=small_disk, env={"BALLAST": str(ballast)}), 120)
    assert code == 3, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], err
    ballast.unlink()
    code, out, err = _finish(_start(*args, cwd=small_disk), timeout=120)
    if code == 3:  # the full disk cut a record short: the line says what to keep
        match = re.search(r"`truncate -s (\d+) (\S+)`", err)
        assert match is not None and len(err.strip().splitlines()) == 1, err
        os.truncate(match.group(2), int(match.group(1)))
        code, out, err = _finish(_start(*args, cwd=small_disk), timeout=120)
    assert code == 0, (out, err)
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(small_disk / "j.log")))
    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials()
    assert len(trials) >= 10 and not any(not t.state.is_finished() for t in trials)
