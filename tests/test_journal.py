"""Optuna's journal file as the storage (``--storage journal:PATH``, issue 12 part 4): run,
kill -9 and rerun, stop, cancel, report, exactly ``--n-trials`` across workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from conftest import log_text, objective, run_cli

pytestmark = pytest.mark.scenario


def _trials(cwd: Path, study: str) -> list[FrozenTrial]:
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(cwd / "j.log")))
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def _run_args(study: str, target: str, n: int, workers: int = 2) -> list[str]:
    return [
        "run", "--study", study, "--storage", "journal:j.log", "--objective", objective(target),
        "--workers", str(workers), "--n-trials", str(n), "--pruner", "none",
    ]  # fmt: skip


def _wait(what: str, condition: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"never: {what}")


def test_run_gives_exactly_n_trials_each_with_its_owner_and_report_reads_it(
    tmp_path: Path, study_name: str
) -> None:
    result = run_cli(*_run_args(study_name, "fast.py:objective", 9, workers=3), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"study {study_name!r} on journal:///" in result.stdout
    trials = _trials(tmp_path, study_name)
    assert [t.number for t in trials] == list(range(9))  # no overshoot across 3 workers
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    assert all(t.user_attrs.get("optguard.worker") for t in trials)
    assert all("optguard.final_rss_bytes" in t.user_attrs for t in trials)
    report = run_cli(
        "report", "--study", study_name, "--storage", "journal:j.log", "--json", cwd=tmp_path
    )
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["states"] == {"COMPLETE": 9}


def test_kill_9_of_the_whole_run_then_rerun_reaps_and_retries(
    tmp_path: Path, study_name: str
) -> None:
    """No heartbeat on a journal file: this host's dead trials are judged by their owner's
    process, as on an RDB storage."""
    args = _run_args(study_name, "restartable.py:objective", 4)
    run = subprocess.Popen(
        [sys.executable, "-m", "optguard", *args], cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    pids = tmp_path / "pids.txt"  # written once a trial has suggested its parameter
    try:
        _wait("2 trials running", lambda: pids.exists() and len(pids.read_text().split()) >= 2)
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=10)
    finally:
        if run.poll() is None:
            run.kill()
    workers = [psutil.Process(int(p)) for p in pids.read_text().split() if psutil.pid_exists(int(p))]
    assert not psutil.wait_procs(workers, 10)[1], "workers outlived their supervisor"
    assert [t.state for t in _trials(tmp_path, study_name)] == [TrialState.RUNNING] * 2

    (tmp_path / "fixed").touch()
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "marked FAIL (interrupted): #0, #1" in result.stdout
    trials = _trials(tmp_path, study_name)
    assert not any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    for old in trials[:2]:
        assert old.state == TrialState.FAIL and old.user_attrs["optguard.reason"] == "interrupted"
        (retry,) = [t for t in trials if t.user_attrs.get("optguard.retry_of") == old.number]
        assert retry.state == TrialState.COMPLETE and retry.params == old.params
    assert len(trials) == 4  # the retries take the slots of the trials they retry


@pytest.mark.parametrize("action", ["stop", "cancel"])
def test_stop_and_cancel_reach_a_run_on_a_journal_file(
    tmp_path: Path, study_name: str, action: str
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "optguard", *_run_args(study_name, "steady.py:objective", 50)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait("2 trials started", lambda: (tmp_path / "logs").exists()
              and log_text(tmp_path).count(" started\n") >= 2)  # fmt: skip
        asked = run_cli(action, "--study", study_name, "--storage", "journal:j.log", cwd=tmp_path)
        assert asked.returncode == 0, asked.stderr
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert f"optguard {action}:" in out
    trials = _trials(tmp_path, study_name)
    assert len(trials) < 50 and not any(t.state == TrialState.RUNNING for t in trials)
    if action == "cancel":
        cancelled = [t for t in trials if t.user_attrs.get("optguard.reason") == "cancelled"]
        assert cancelled and {t.state for t in cancelled} == {TrialState.PRUNED}
    else:
        assert {t.state for t in trials} == {TrialState.COMPLETE}


def test_a_journal_url_without_a_file_is_bad_input(tmp_path: Path, study_name: str) -> None:
    result = run_cli(
        "run", "--study", study_name, "--storage", "journal:", "--objective",
        objective("fast.py:objective"), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "journal:" in result.stderr
    missing = run_cli(
        "run", "--study", study_name, "--storage", "journal:///nonexistent/dir/j.log",
        "--objective", objective("fast.py:objective"), cwd=tmp_path,
    )  # fmt: skip
    assert missing.returncode == 2
    assert "directory /nonexistent/dir does not exist" in missing.stderr
    assert not list(tmp_path.glob("*.log"))


def test_another_hosts_running_trial_is_not_waited_for_the_run_ends_incomplete(
    tmp_path: Path, study_name: str
) -> None:
    """Without a heartbeat nothing tells a dead host from a live one: the run does not wait
    for ever on a trial of another host; it runs its own and says what is left (exit 6)."""
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "j.log")))
    study = optuna.create_study(study_name=study_name, storage=storage)
    study.ask().set_user_attr("optguard.worker", "some-other-host:4242")
    result = run_cli(*_run_args(study_name, "fast.py:objective", 3, workers=1), cwd=tmp_path)
    assert result.returncode == 6, result.stdout + result.stderr
    assert "2/3 trials finished, 1 RUNNING" in result.stderr
    states = [t.state for t in _trials(tmp_path, study_name)]
    assert states == [TrialState.RUNNING, TrialState.COMPLETE, TrialState.COMPLETE]


def test_a_record_cut_short_or_a_file_that_is_no_journal_is_refused_untouched(
    tmp_path: Path, study_name: str
) -> None:
    """Appending after a torn last record would make the whole file unreadable for good
    (optuna/optuna#5138): one line saying what to keep, exit 3, the file as it was."""
    assert run_cli(*_run_args(study_name, "fast.py:objective", 2), cwd=tmp_path).returncode == 0
    journal = tmp_path / "j.log"
    whole = journal.stat().st_size
    with journal.open("ab") as fh:
        fh.write(b'{"op_code":4,"worker_id":"x","trial_id":1,"syste')
    torn = journal.read_bytes()
    for command in (_run_args(study_name, "fast.py:objective", 4),
                    ["report", "--study", study_name, "--storage", "journal:j.log"]):  # fmt: skip
        result = run_cli(*command, cwd=tmp_path)
        assert result.returncode == 3, result.stdout + result.stderr
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert f"`truncate -s {whole} {journal}`" in result.stderr
        assert journal.read_bytes() == torn
    os.truncate(journal, whole)
    assert run_cli(*_run_args(study_name, "fast.py:objective", 4), cwd=tmp_path).returncode == 0
    assert len(_trials(tmp_path, study_name)) == 4

    other = tmp_path / "notes.txt"
    other.write_text("hello world\n")
    result = run_cli(
        "run", "--study", study_name, "--storage", "journal:notes.txt",
        "--objective", objective("fast.py:objective"), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 3 and "is not an Optuna journal file" in result.stderr
    assert other.read_text() == "hello world\n"


def test_a_second_run_here_waits_for_the_first_runs_live_trials(
    tmp_path: Path, study_name: str
) -> None:
    """Two runs on one host and journal: this host's RUNNING trials are judged by their
    owner's process, so the second run waits for the first one's live trials (exit 0 once
    they finish), where another host's would not be waited for."""
    args = _run_args(study_name, "restartable.py:objective", 4, workers=1)
    first = subprocess.Popen(
        [sys.executable, "-m", "optguard", *args], cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    second = None
    try:
        pids = tmp_path / "pids.txt"
        _wait("the first run's trial", lambda: pids.exists() and pids.read_text().strip())
        second = subprocess.Popen(
            [sys.executable, "-m", "optguard", *_run_args(study_name, "fast.py:objective", 3)],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        _wait("the second run's trials", lambda: len(_trials(tmp_path, study_name)) >= 3)
        time.sleep(2)  # a second run that does not wait ends here, with exit 6
        assert second.poll() is None, second.communicate()
        (tmp_path / "fixed").touch()
        out, err = second.communicate(timeout=60)
        assert second.returncode == 0, out + err
        assert first.wait(timeout=60) == 0
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    trials = _trials(tmp_path, study_name)
    assert {t.state for t in trials} == {TrialState.COMPLETE}
