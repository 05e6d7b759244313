"""The shipped examples run under optguard as a user would start them."""

from __future__ import annotations

from pathlib import Path

import pytest
from optuna.trial import TrialState

from conftest import REPO, load_trials, log_text, run_cli, sqlite_url


def test_kfold_example(tmp_path: Path) -> None:
    result = run_cli(
        "run", "--study", "kfold", "--objective", str(REPO / "scripts/examples/kfold.py:objective"),
        "--n-trials", "5", "--pruner", "none", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    trials = load_trials(sqlite_url(tmp_path), "kfold")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    assert all(len(t.intermediate_values) == 5 for t in trials)  # one report per fold


def test_torch_example(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    result = run_cli(
        "run", "--study", "torch", "--objective",
        str(REPO / "scripts/examples/torch_train.py:objective"),
        "--n-trials", "2", "--pruner", "none", "--max-rss", "4GB", cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    trials = load_trials(sqlite_url(tmp_path), "torch")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert all(0 < t.value < 1 for t in trials)  # BCE of a model that learned something
    assert log_text(tmp_path).count("final memory: ") == 2
