"""Every bad input: one line on stderr, no traceback, its exit code, the study untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest

from conftest import load_trials, objective, run_cli, sqlite_url

STUDY = "existing"


def _snapshot(url: str) -> list[tuple[Any, ...]]:
    return [
        (t.number, t.state, t.params, t.values, t.user_attrs, t.datetime_complete)
        for t in load_trials(url, STUDY)
    ]


@pytest.fixture
def study_dir(tmp_path: Path) -> Path:
    """A directory whose default storage already holds a study with three finished trials."""
    study = optuna.create_study(study_name=STUDY, storage=sqlite_url(tmp_path))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    return tmp_path


GOOD = objective("fast.py:objective")
CASES = [
    # (arguments after `run --study existing`, exit code, text in the one error line)
    (["--objective", "no_such_module_xyz:fn"], 2, "objective module not found: no_such_module_xyz"),
    (["--objective", objective("broken_import.py:objective")], 2,
     "ModuleNotFoundError: No module named 'module_that_does_not_exist_xyz'"),
    (["--objective", objective("outcomes.py:not_callable")], 2, "is not callable (it is a int)"),
    (["--objective", objective("outcomes.py:missing")], 2, "has no attribute 'missing'"),
    (["--objective", "does/not/exist.py:objective"], 2, "objective file not found"),
    (["--objective", "no_colon_here"], 2, "must be 'package.module:function'"),
    (["--objective", GOOD, "--storage", "::not a url::"], 2, "cannot parse storage URL"),
    (["--objective", GOOD, "--storage", "redis://localhost"], 2, "unsupported storage backend"),
    (["--objective", GOOD, "--storage", "postgresql://postgres@127.0.0.1:1/test"], 3,
     "cannot connect to storage postgresql://postgres@127.0.0.1:1/test"),
    (["--objective", GOOD, "--n-trials", "0"], 2, "--n-trials must be at least 1, got 0"),
    (["--objective", GOOD, "--n-trials", "many"], 2, "Invalid value for '--n-trials'"),
    (["--objective", GOOD, "--workers", "0"], 2, "--workers must be at least 1, got 0"),
    (["--objective", GOOD, "--timeout", "soon"], 2, "--timeout: cannot parse 'soon'"),
    (["--objective", GOOD, "--timeout", "0s"], 2, "--timeout: must be positive"),
    (["--objective", GOOD, "--max-rss", "12XB"], 2, "--max-rss: unknown size unit 'xb'"),
    (["--objective", GOOD, "--max-rss", "-1GB"], 2, "--max-rss: cannot parse '-1GB'"),
    (["--objective", GOOD, "--config", "missing.toml"], 2, "config file not found: missing.toml"),
    (["--objective", GOOD, "--direction", "maximize"], 2,
     "study 'existing' exists with direction minimize, not maximize"),
    (["--objective", GOOD, "--sampler", "magic"], 2, "--sampler must be one of"),
    (["--objective", GOOD, "--frobnicate"], 2, "No such option: --frobnicate"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "code", "message"), CASES, ids=[c[2][:40] for c in CASES])
def test_bad_input(study_dir: Path, args: list[str], code: int, message: str) -> None:
    url = sqlite_url(study_dir)
    before = _snapshot(url)
    result = run_cli("run", "--study", STUDY, "--n-trials", "5", *args, cwd=study_dir)
    assert result.returncode == code, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("optguard: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert _snapshot(url) == before


def test_missing_study_option(study_dir: Path) -> None:
    result = run_cli("run", "--objective", GOOD, cwd=study_dir)
    assert result.returncode == 2
    assert result.stderr.strip() == "optguard: error: missing required option --study"


def test_config_unknown_key_and_wrong_type(study_dir: Path) -> None:
    cfg = study_dir / "bad.toml"
    cfg.write_text(f'study = "{STUDY}"\nobjective = "{GOOD}"\nworkerz = 2\n')
    result = run_cli("run", "--config", str(cfg), cwd=study_dir)
    assert result.returncode == 2 and "unknown key 'workerz'" in result.stderr
    cfg.write_text(f'study = "{STUDY}"\nobjective = "{GOOD}"\nn_trials = "ten"\n')
    result = run_cli("run", "--config", str(cfg), cwd=study_dir)
    assert result.returncode == 2 and "n_trials must be int, got str" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_debug_shows_the_traceback(study_dir: Path) -> None:
    result = run_cli(
        "--debug", "run", "--study", STUDY, "--objective", "no_colon_here", cwd=study_dir
    )
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("optguard: error: ")

