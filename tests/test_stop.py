"""Stop and cancel, from another process and with Ctrl+C: timing and final states."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from conftest import load_trials, log_text, objective, run_cli, sqlite_url

pytestmark = pytest.mark.scenario


def _start(cwd: Path, study: str, target: str = "steady.py:objective") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "optguard", "run", "--study", study, "--workers", "2",
         "--objective", objective(target), "--n-trials", "50", "--pruner", "none"],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_running(cwd: Path, count: int = 2) -> float:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (cwd / "logs").exists() and log_text(cwd).count(" started\n") >= count:
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError("trials never started")


def _finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_stop_lets_running_trials_finish(tmp_path: Path, study_name: str) -> None:
    proc = _start(tmp_path, study_name)
    _wait_running(tmp_path)
    asked = run_cli("stop", "--study", study_name, cwd=tmp_path)
    assert asked.returncode == 0 and "stop requested" in asked.stdout
    out, err = _finish(proc)
    assert proc.returncode == 130, err  # stopped: the study does not have its trials
    assert "optguard stop: no new trials" in out
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert 2 <= len(trials) <= 4 and {t.state for t in trials} == {TrialState.COMPLETE}
    # A later run clears the flag, says so, and continues.
    again = run_cli("run", "--study", study_name, "--objective", objective("fast.py:objective"),
                    "--n-trials", str(len(trials) + 2), cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "cleared the pending 'stop' request; continuing" in again.stdout
    assert len(load_trials(sqlite_url(tmp_path), study_name)) == len(trials) + 2


def test_cancel_prunes_running_trials_at_next_check(tmp_path: Path, study_name: str) -> None:
    proc = _start(tmp_path, study_name)
    _wait_running(tmp_path)
    assert run_cli("cancel", "--study", study_name, cwd=tmp_path).returncode == 0
    out, err = _finish(proc)
    assert proc.returncode == 130, err
    trials = load_trials(sqlite_url(tmp_path), study_name)
    cancelled = [t for t in trials if t.user_attrs.get("optguard.reason") == "cancelled"]
    assert len(cancelled) >= 1 and {t.state for t in cancelled} == {TrialState.PRUNED}
    assert not any(t.state == TrialState.RUNNING for t in trials)
    # No timing assertion (tests run two at a time): the pruning at a check, not the kill
    # step 10 s later, is what the enforcement "check" on each cancelled trial shows.
    assert {t.user_attrs.get("optguard.enforcement") for t in cancelled} == {"check"}


def test_cancel_kills_a_trial_that_never_checks(tmp_path: Path, study_name: str) -> None:
    proc = _start(tmp_path, study_name, "faults/c_hang.py:objective")
    _wait_running(tmp_path, 1)
    assert run_cli("cancel", "--study", study_name, cwd=tmp_path).returncode == 0
    _, err = _finish(proc)
    assert proc.returncode == 130, err
    (first,) = [t for t in load_trials(sqlite_url(tmp_path), study_name) if t.number == 0]
    assert first.state == TrialState.PRUNED
    assert first.user_attrs["optguard.reason"] == "cancelled"
    assert first.user_attrs["optguard.hard_kill"] is True


def test_ctrl_c_once_stops_twice_cancels(tmp_path: Path, study_name: str) -> None:
    proc = _start(tmp_path, study_name)
    _wait_running(tmp_path)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = _finish(proc)
    assert proc.returncode == 130
    assert "Ctrl+C again cancels them" in out and "cancelling" in out
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert not any(t.state == TrialState.RUNNING for t in trials)
    assert {t.user_attrs.get("optguard.reason") for t in trials} == {"cancelled"}


def test_ctrl_c_once_finishes_running_trials(tmp_path: Path, study_name: str) -> None:
    proc = _start(tmp_path, study_name)
    _wait_running(tmp_path)
    proc.send_signal(signal.SIGINT)
    _finish(proc)
    assert proc.returncode == 130
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert 2 <= len(trials) <= 4 and {t.state for t in trials} == {TrialState.COMPLETE}


def test_sigterm_cancels(tmp_path: Path, study_name: str) -> None:
    proc = _start(tmp_path, study_name)
    _wait_running(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _finish(proc)
    assert proc.returncode == 130
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert {t.state for t in trials} == {TrialState.PRUNED}
    assert {t.user_attrs["optguard.reason"] for t in trials} == {"cancelled"}


def test_stop_unknown_study(tmp_path: Path) -> None:
    result = run_cli("stop", "--study", "nope", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("optguard: error: no study named 'nope'")
    assert not (tmp_path / "optguard.db").exists()
    assert run_cli("run", "--study", "s", "--objective", objective("fast.py:objective"),
                   "--n-trials", "1", cwd=tmp_path).returncode == 0  # fmt: skip
    result = run_cli("cancel", "--study", "other", cwd=tmp_path)
    assert result.returncode == 2 and "no study named 'other'" in result.stderr
