"""Restarting the same command: reap what a dead run left RUNNING, retry once, tag trials."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from conftest import load_trials, log_text, objective, run_cli, sqlite_url

pytestmark = pytest.mark.scenario
TARGET = objective("restartable.py:objective")


def _args(study: str, *extra: str) -> list[str]:
    return ["run", "--study", study, "--objective", TARGET, "--pruner", "none", *extra]


def _wait_started(cwd: Path, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (cwd / "logs").exists() and log_text(cwd).count(" started\n") >= count:
            return
        time.sleep(0.05)
    raise AssertionError("trials never started")


def test_restart_after_sigkill_of_whole_run(tmp_path: Path, study_name: str) -> None:
    run = subprocess.Popen(
        [sys.executable, "-m", "optguard", *_args(study_name, "--workers", "2", "--n-trials", "6")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_started(tmp_path, 2)
        pids = tmp_path / "pids.txt"  # written once a trial has suggested its parameter
        while not (pids.exists() and len(pids.read_text().split()) >= 2):
            time.sleep(0.05)
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=10)
    finally:
        if run.poll() is None:
            run.kill()
    workers = [int(p) for p in (tmp_path / "pids.txt").read_text().split()]
    gone = psutil.wait_procs([psutil.Process(p) for p in workers if psutil.pid_exists(p)], 10)
    assert not gone[1], "workers outlived their supervisor"
    before = load_trials(sqlite_url(tmp_path), study_name)
    assert [t.state for t in before] == [TrialState.RUNNING] * 2  # what a dead run leaves

    (tmp_path / "fixed").touch()
    result = run_cli(*_args(study_name, "--workers", "2", "--n-trials", "6"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 trial(s) left RUNNING by a run that died marked FAIL (interrupted): #0, #1" in (
        result.stdout
    )
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert len(trials) == 6 and not any(t.state == TrialState.RUNNING for t in trials)
    for old in trials[:2]:
        assert old.state == TrialState.FAIL
        assert old.user_attrs["optguard.reason"] == "interrupted"
        (retry,) = [t for t in trials if t.user_attrs.get("optguard.retry_of") == old.number]
        assert retry.state == TrialState.COMPLETE and retry.params == old.params
        # Optuna's own retry records answer for optguard's retries too
        assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == old.number
        assert RetryHeartbeatStaleTrialCallback.retry_history(retry) == [old.number]

    again = run_cli(*_args(study_name, "--n-trials", "6"), cwd=tmp_path)
    assert again.returncode == 0 and "enqueued" not in again.stdout
    assert len(load_trials(sqlite_url(tmp_path), study_name)) == 6


def test_retry_pruned_enqueues_once_and_tags(tmp_path: Path, study_name: str) -> None:
    guard = ["--timeout", "0.5", "--grace", "0.5", "--kill-after", "1"]
    first = run_cli(*_args(study_name, "--n-trials", "2", *guard), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    pruned = load_trials(sqlite_url(tmp_path), study_name)
    assert [t.user_attrs.get("optguard.reason") for t in pruned] == ["timeout", "timeout"]

    (tmp_path / "fixed").touch()
    for total in ("4", "6"):  # the second run must not enqueue the same trials again
        result = run_cli(
            *_args(study_name, "--n-trials", total, "--retry-pruned", "timeout,memory",
                   "--tag", "fix-1"),
            cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert len(trials) == 6
    retries = Counter(t.user_attrs.get("optguard.retry_of") for t in trials)
    assert retries == {None: 4, 0: 1, 1: 1}
    for old in pruned:
        (retry,) = [t for t in trials if t.user_attrs.get("optguard.retry_of") == old.number]
        assert retry.params == old.params and retry.state == TrialState.COMPLETE
        assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == old.number
    assert [t.user_attrs.get("optguard.tag") for t in trials] == [None, None] + ["fix-1"] * 4


def test_retry_pruned_rejects_unknown_reason(tmp_path: Path, study_name: str) -> None:
    result = run_cli(*_args(study_name, "--retry-pruned", "timeout,boredom"), cwd=tmp_path)
    assert result.returncode == 2
    assert "--retry-pruned: unknown reason 'boredom'" in result.stderr


@pytest.mark.filterwarnings("ignore::UserWarning")  # Optuna on this test's own ask() with a heartbeat
def test_other_hosts_stale_trial_is_reaped_by_heartbeat(pg_study: str, tmp_path: Path) -> None:
    """A trial RUNNING on a host that died (no more heartbeats) is failed and retried once."""
    import optuna

    from conftest import PG_URL

    storage = optuna.storages.RDBStorage(PG_URL, heartbeat_interval=1, grace_period=4)
    study = optuna.create_study(study_name=pg_study, storage=storage)
    ghost = study.ask()
    ghost.suggest_float("x", 0.0, 1.0)
    ghost.set_user_attr("optguard.worker", "host-that-died:4242")
    storage.record_heartbeat(ghost._trial_id)  # then it never beats again
    (tmp_path / "fixed").touch()
    result = run_cli(
        *_args(pg_study, "--n-trials", "3", "--storage", PG_URL, "--heartbeat", "1",
               "--workers", "1"),
        cwd=tmp_path, env={"OPTGUARD_TEST_SLOW": "3"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "owner gone for trial(s) #0: marked FAIL (interrupted); retrying #0" in result.stdout
    trials = load_trials(PG_URL, pg_study)
    assert trials[0].state == TrialState.FAIL
    assert trials[0].user_attrs["optguard.reason"] == "interrupted"
    assert "no heartbeat from worker host-that-died:4242" in trials[0].user_attrs["optguard.error"]
    (retry,) = [t for t in trials if t.user_attrs.get("optguard.retry_of") == 0]
    assert retry.state == TrialState.COMPLETE and retry.params == trials[0].params
    assert not any(t.state == TrialState.RUNNING for t in trials)
