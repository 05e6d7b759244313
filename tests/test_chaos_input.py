"""Hostile input to ``optguard run``/``report`` (issue 10, points 10, 18-21), end to end.

Every case runs the real CLI in a subprocess against real storage. Bad input must give one line
on stderr, its exit code, no traceback, no password fragment anywhere, and leave the storage
as it was: no study row or SQLite file for a new study, every trial and study attribute
unchanged for an existing one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from conftest import MYSQL_URL, PG_URL, load_trials, objective, run_cli, sqlite_url

pytestmark = pytest.mark.scenario

GOOD = objective("fast.py:objective")
EXISTING = "existing"


def _fragments(secret: str, shortest: int = 3) -> set[str]:
    """Every piece of ``secret`` long enough to identify it: none may be printed."""
    return {
        secret[i:j] for i in range(len(secret)) for j in range(i + shortest, len(secret) + 1)
    }


def _all_output(result: subprocess.CompletedProcess[str], cwd: Path) -> str:
    logs = "".join(p.read_text(errors="replace") for p in sorted(cwd.glob("logs/*")))
    return result.stdout + result.stderr + logs


def _one_error_line(result: subprocess.CompletedProcess[str], code: int, text: str) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("optguard: error: ") and text in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


def _snapshot(url: str, study: str) -> tuple[Any, ...]:
    """Everything a run could change: the study's attributes and every trial's fields."""
    storage = optuna.storages.get_storage(url)
    study_id = storage.get_study_id_from_name(study)
    trials = [
        (t.number, t.state, t.params, t.values, t.user_attrs, t.system_attrs,
         t.datetime_start, t.datetime_complete)
        for t in load_trials(url, study)
    ]  # fmt: skip
    return (
        storage.get_study_user_attrs(study_id),
        storage.get_study_system_attrs(study_id),
        storage.get_study_directions(study_id),
        trials,
    )


@pytest.fixture
def existing(tmp_path: Path) -> Path:
    """A directory whose default SQLite storage holds a study with three finished trials."""
    study = optuna.create_study(study_name=EXISTING, storage=sqlite_url(tmp_path))
    study.set_user_attr("owner", "someone")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    return tmp_path


def _run(cwd: Path, study: str, *args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return run_cli(
        "run", "--study", study, "--n-trials", "2", "--timeout", "7s", *args, cwd=cwd, env=env
    )


# -- 18: passwords ---------------------------------------------------------------------------

QUERY_SECRET = "Qz7kWv9xJ"


@pytest.mark.parametrize("param", ["password", "sslpassword"])
def test_password_in_query_is_never_printed(
    tmp_path: Path, pg_study: str, param: str
) -> None:
    """The server trusts 127.0.0.1, so the run succeeds and its whole output can be read."""
    url = f"{PG_URL}?{param}={QUERY_SECRET}"
    result = _run(tmp_path, pg_study, "--objective", GOOD, "--storage", url)
    assert result.returncode == 0, result.stderr
    assert f"{param}=***" in result.stdout  # the URL is shown, masked
    report = run_cli("report", "--study", pg_study, "--storage", url, "--json", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["storage"].endswith(f"{param}=***")
    shown = _all_output(result, tmp_path) + report.stdout + report.stderr
    assert (tmp_path / "logs").is_dir() and "Worker started" in shown
    assert not {f for f in _fragments(QUERY_SECRET) if f in shown}


def test_password_in_query_redacted_from_driver_error(tmp_path: Path, study_name: str) -> None:
    """MariaDB's root has no password: one given in the query is refused (exit 3)."""
    url = f"{MYSQL_URL}?password={QUERY_SECRET}"
    result = _run(tmp_path, study_name, "--objective", GOOD, "--storage", url)
    _one_error_line(result, 3, "cannot connect to storage")
    shown = _all_output(result, tmp_path)
    assert not {f for f in _fragments(QUERY_SECRET) if f in shown}


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:Pq@Zx:w9Kj@127.0.0.1/test",  # '@' and ':' unencoded: port 'w9Kj@127...'
        "postgresql://u:Pq@Zxw9Kj@127.0.0.1/test",  # parses with host 'Zxw9Kj@127.0.0.1'
        "postgresql://u:Pq@Zx/w9Kj@127.0.0.1/test",
    ],
)
def test_unencoded_password_is_a_usage_error(tmp_path: Path, study_name: str, url: str) -> None:
    password = url.split("://u:", 1)[1].rsplit("@", 1)[0]
    result = _run(tmp_path, study_name, "--objective", GOOD, "--storage", url)
    line = _one_error_line(result, 2, "cannot parse storage URL")
    assert "%40" in line  # says how to write it
    shown = _all_output(result, tmp_path)
    assert not {f for f in _fragments(password) if f in shown}, shown
    assert not (tmp_path / "optguard.db").exists()


# -- 19: objective target checked before the storage is touched ------------------------------


def _targets(root: Path) -> dict[str, str]:
    """Bad targets, each in its own files under ``root`` (the run's working directory)."""
    (root / "syntax_bad.py").write_text("def objective(trial):\n    return (1 +\n\nx = 2\n")
    (root / "typo.py").write_text("def objective(trial):\n    return 1.0\n")
    package = root / "pkg_chaos"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text("def objective(trial):\n    return 1.0\n")
    return {
        "missing file": f"{root / 'nope.py'}:objective",
        "function typo": f"{root / 'typo.py'}:objectiv",
        "syntax error": f"{root / 'syntax_bad.py'}:objective",
        "module not found": "pkg_chaos.nomod:objective",
        "module lacks function": "pkg_chaos.mod:objectiv",
    }


TARGET_MESSAGES = {
    "missing file": "objective file not found",
    "function typo": "has no attribute 'objectiv' (did you mean 'objective'?)",
    "syntax error": "syntax_bad.py:2: SyntaxError",
    "module not found": "objective module not found: pkg_chaos.nomod",
    "module lacks function": "pkg_chaos.mod has no attribute 'objectiv'",
}


@pytest.mark.parametrize("case", list(TARGET_MESSAGES))
def test_bad_objective_creates_nothing(tmp_path: Path, study_name: str, case: str) -> None:
    target = _targets(tmp_path)[case]
    result = _run(tmp_path, study_name, "--objective", target)
    _one_error_line(result, 2, TARGET_MESSAGES[case])
    assert not (tmp_path / "optguard.db").exists()
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("case", list(TARGET_MESSAGES))
def test_bad_objective_changes_nothing(existing: Path, case: str) -> None:
    target = _targets(existing)[case]
    url = sqlite_url(existing)
    before = _snapshot(url, EXISTING)
    result = _run(existing, EXISTING, "--objective", target)
    _one_error_line(result, 2, TARGET_MESSAGES[case])
    assert _snapshot(url, EXISTING) == before


def test_bad_objective_on_server_creates_no_study(tmp_path: Path, pg_study: str) -> None:
    target = _targets(tmp_path)["function typo"]
    result = _run(tmp_path, pg_study, "--objective", target, "--storage", PG_URL)
    _one_error_line(result, 2, TARGET_MESSAGES["function typo"])
    assert pg_study not in optuna.get_all_study_names(storage=PG_URL)


# -- 20: unwritable paths ---------------------------------------------------------------------


def _readonly_run(directory: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with ``directory`` read-only, also for root (tests run as root, whom
    ``chmod 555`` does not stop): a private mount namespace (``unshare -m``) where the
    directory is bind-mounted onto itself and remounted ``ro``; other processes see no
    change. ``cd`` after the mount, so the working directory is the read-only view."""
    script = 'd="$1"; shift; mount --bind "$d" "$d" && mount -o remount,ro,bind "$d" && ' \
             'cd "$d" && exec "$@"'  # fmt: skip
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", str(directory), *argv],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def readonly_works(tmp_path_factory: pytest.TempPathFactory) -> None:
    probe = tmp_path_factory.mktemp("ro-probe")
    result = _readonly_run(probe, "touch", "x")
    if result.returncode == 0 or "Read-only file system" not in result.stderr:
        pytest.skip(f"cannot make a read-only directory here (unshare -m): {result.stderr!r}")


@pytest.mark.parametrize("option", ["--log-dir", "--checkpoint-dir"])
def test_directory_option_naming_a_file(existing: Path, study_name: str, option: str) -> None:
    (existing / "a_file").write_text("not a directory\n")
    url = sqlite_url(existing)
    before = _snapshot(url, EXISTING)
    for study in (EXISTING, study_name):
        result = _run(existing, study, "--objective", GOOD, option, "a_file")
        _one_error_line(result, 2, f"{option} a_file: not a directory")
        result = _run(existing, study, "--objective", GOOD, option, "a_file/sub")
        _one_error_line(result, 2, f"{option} a_file/sub: a_file is not a directory")
    assert _snapshot(url, EXISTING) == before
    assert optuna.get_all_study_names(storage=url) == [EXISTING]
    assert (existing / "a_file").read_text() == "not a directory\n"


def test_readonly_working_directory(tmp_path: Path, study_name: str, readonly_works: None) -> None:
    """The default storage ``optguard.db`` cannot be created in a read-only directory."""
    work = tmp_path / "work"
    work.mkdir()
    logs = tmp_path / "logs"
    cli = [sys.executable, "-m", "optguard", "run", "--study", study_name, "--n-trials", "1",
           "--objective", GOOD]  # fmt: skip
    result = _readonly_run(work, *cli, "--log-dir", str(logs))
    line = _one_error_line(result, 2, f"cannot create the SQLite storage {work / 'optguard.db'}")
    assert "Read-only file system" in line
    assert not logs.exists() and list(work.iterdir()) == []
    result = _readonly_run(work, *cli)  # the default log dir is there too
    _one_error_line(result, 2, "--log-dir logs: cannot create")


def test_readonly_sqlite_file_directory(existing: Path, readonly_works: None) -> None:
    """An existing study in a read-only directory: SQLite could not write its journal."""
    url = sqlite_url(existing)
    before = _snapshot(url, EXISTING)
    result = _readonly_run(
        existing, sys.executable, "-m", "optguard", "run", "--study", EXISTING,
        "--n-trials", "5", "--objective", GOOD, "--log-dir", "/tmp",
    )  # fmt: skip
    _one_error_line(result, 2, f"SQLite storage {existing / 'optguard.db'}")
    assert _snapshot(url, EXISTING) == before


def _reported(tmp_path: Path) -> str:
    study = optuna.create_study(study_name="rep", storage=sqlite_url(tmp_path))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    return "rep"


@pytest.mark.parametrize("suffix", [".html", ".png"])
def test_report_plot_into_missing_directory(tmp_path: Path, suffix: str) -> None:
    _reported(tmp_path)
    result = run_cli("report", "--study", "rep", "--plot", f"no/such/dir/p{suffix}", cwd=tmp_path)
    _one_error_line(result, 2, f"--plot: cannot write no/such/dir/p{suffix}")
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("suffix", [".html", ".png"])
def test_report_plot_into_readonly_directory(
    tmp_path: Path, suffix: str, readonly_works: None
) -> None:
    _reported(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    result = _readonly_run(
        out, sys.executable, "-m", "optguard", "report", "--study", "rep",
        "--storage", sqlite_url(tmp_path), "--plot", f"p{suffix}",
    )  # fmt: skip
    line = _one_error_line(result, 2, f"--plot: cannot write p{suffix}")
    assert "Read-only file system" in line
    assert list(out.iterdir()) == []


# -- 21: one log file per study -----------------------------------------------------------------


@pytest.mark.parametrize("names", [("exp/1", "exp 1"), ("学习", "実験")])
def test_studies_with_unsafe_names_get_their_own_logs(
    tmp_path: Path, names: tuple[str, str]
) -> None:
    for name in names:
        result = _run(tmp_path, name, "--objective", GOOD, "--pruner", "none")
        assert result.returncode == 0, result.stderr
    files = sorted((tmp_path / "logs").glob("worker_*.log"))
    assert len(files) == 2, files
    for name in names:
        (own,) = [f for f in files if f"study={name} " in f.read_text()]
        other = next(n for n in names if n != name)
        assert f"study={other} " not in own.read_text()
        finished = own.read_text().count(" finished: state=COMPLETE")
        assert finished == 2  # each study's own two trials, none of the other's


def test_safe_study_name_keeps_its_log_name(tmp_path: Path) -> None:
    """Users grep ``logs/worker_<study>_*.log``: a name that needs no change keeps it."""
    result = _run(tmp_path, "exp-1.v2_a", "--objective", GOOD)
    assert result.returncode == 0, result.stderr
    (log,) = (tmp_path / "logs").glob("worker_*.log")
    host = socket.gethostname()
    if re.fullmatch(r"[A-Za-z0-9._-]+", host) is None:
        pytest.skip(f"host name {host!r} itself needs replacing: the file name is not known")
    assert log.name == f"worker_exp-1.v2_a_{host}_0.log"  # no hash added


# -- 10: sampler dependencies -------------------------------------------------------------------


def test_cmaes_sampler_without_its_package(tmp_path: Path, study_name: str) -> None:
    """The real case: the optional package ``cmaes`` is not installed in this environment."""
    if importlib.util.find_spec("cmaes") is not None:
        pytest.skip("cmaes is installed here; the blocked-import test below covers the check")
    result = _run(tmp_path, study_name, "--objective", GOOD, "--sampler", "cmaes")
    _one_error_line(
        result, 2, "--sampler cmaes needs the package 'cmaes': pip install cmaes"
    )
    assert not (tmp_path / "optguard.db").exists()


BLOCK = "import sys\nfor name in sys.argv.pop(1).split(','):\n    sys.modules[name] = None\n" \
        "from optguard.cli import main\nmain()\n"  # fmt: skip


@pytest.mark.parametrize(
    ("sampler", "blocked", "message"),
    [
        ("gp", "torch", "--sampler gp needs the package 'torch': pip install torch"),
        ("gp", "torch,scipy", "--sampler gp needs the packages 'torch', 'scipy': "
                              "pip install torch scipy"),
        ("qmc", "scipy", "--sampler qmc needs the package 'scipy': pip install scipy"),
    ],
)  # fmt: skip
def test_sampler_without_its_package(
    existing: Path, sampler: str, blocked: str, message: str
) -> None:
    """torch and scipy are installed here, so they are made unimportable for the supervisor:
    ``sys.modules[name] = None`` is Python's own import blocker (``import name`` raises
    ModuleNotFoundError and ``importlib.util.find_spec(name)`` returns None), i.e. exactly what
    a missing package looks like to the check, with no finder or path faked."""
    url = sqlite_url(existing)
    before = _snapshot(url, EXISTING)
    result = subprocess.run(
        [sys.executable, "-c", BLOCK, blocked, "run", "--study", EXISTING, "--n-trials", "5",
         "--objective", GOOD, "--sampler", sampler],
        cwd=existing, capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )  # fmt: skip
    _one_error_line(result, 2, message)
    assert _snapshot(url, EXISTING) == before
    assert not (existing / "logs").exists()


def test_sampler_with_its_packages_runs(tmp_path: Path, study_name: str) -> None:
    """The check must not reject what works: qmc with scipy installed runs its trials."""
    if importlib.util.find_spec("scipy") is None:
        pytest.skip("scipy is not installed")
    result = _run(tmp_path, study_name, "--objective", GOOD, "--sampler", "qmc")
    assert result.returncode == 0, result.stderr
    states = [t.state for t in load_trials(sqlite_url(tmp_path), study_name)]
    assert states == [TrialState.COMPLETE] * 2
