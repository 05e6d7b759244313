"""Shared helpers: run the real CLI in a subprocess and read the real storage."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import optuna
import pytest

OBJECTIVES = Path(__file__).parent / "objectives"
REPO = Path(__file__).parent.parent
PG_URL = os.environ.get("OPTGUARD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get("OPTGUARD_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")


def objective(target: str) -> str:
    """``file.py:fn`` under tests/objectives as an absolute target."""
    name, fn = target.split(":")
    return f"{OBJECTIVES / name}:{fn}"


def run_cli(
    *args: str, cwd: Path, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "optguard", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def load_trials(url: str, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line of a bad-input refusal: exit 2, ``optguard: error: ...``, nothing else."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("optguard: error: "), result.stderr
    return lines[0]


def sqlite_url(cwd: Path) -> str:
    return f"sqlite:///{cwd / 'optguard.db'}"


def log_text(cwd: Path) -> str:
    return "".join(p.read_text() for p in sorted((cwd / "logs").glob("worker_*.log")))


@pytest.fixture(autouse=True)
def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def study_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def _server_study(url: str, name: str) -> Iterator[str]:
    yield name
    try:
        optuna.delete_study(study_name=name, storage=url)
    except KeyError:
        pass  # the test never created it


@pytest.fixture
def pg_study(study_name: str) -> Iterator[str]:
    yield from _server_study(PG_URL, study_name)


@pytest.fixture
def mysql_study(study_name: str) -> Iterator[str]:
    yield from _server_study(MYSQL_URL, study_name)


FAULT_METRICS: list[dict[str, object]] = []


def pytest_terminal_summary(terminalreporter: object) -> None:
    """Print what the fault scenarios measured: the numbers behind the README's table."""
    if not FAULT_METRICS:
        return
    write = terminalreporter.write_line  # type: ignore[attr-defined]
    write("")
    write("fault scenario            outcome                          latency_s  overshoot_mb")
    for m in FAULT_METRICS:
        latency = "-" if m["latency_s"] is None else f"{m['latency_s']:.2f}"
        overshoot = "-" if m["overshoot_mb"] is None else f"{m['overshoot_mb']:.0f}"
        write(f"{m['scenario']:<25} {m['outcome']:<32} {latency:>9}  {overshoot:>12}")
