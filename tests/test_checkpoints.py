"""Trial checkpoints: atomic saves, rotation, failures, resume on retry, emergency saves, prune.

Real processes, real storage, real signals: a save is killed mid-write with SIGKILL, a full
disk is a real ``RLIMIT_FSIZE``, interrupts come from ``optguard run`` and ``kill``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from conftest import REPO, load_trials, log_text, objective, run_cli, sqlite_url
from optguard.checkpointing import CHECKPOINT_DIR_ENV, METADATA, CheckpointManager, checkpoints
from optguard.errors import CheckpointError
from optguard.logs import safe_name

TARGET = "checkpointed.py:{}"


def _tmp_files(directory: Path) -> list[Path]:
    return list(directory.glob(".tmp-*"))


# -- the manager, in this process and in a killed one ---------------------------------------------
def test_rotation_and_metadata(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", keep=3)
    assert manager.latest() is None and manager.steps() == []
    for step in range(6):
        manager.save({"step": step, "blob": b"x" * (1000 * step)}, step)
    assert manager.steps() == [3, 4, 5]
    assert manager.latest() == (5, {"step": 5, "blob": b"x" * 5000})
    assert manager.load(3)["step"] == 3
    manager.save({"step": 5, "again": True}, 5)  # the same step is replaced, atomically
    assert manager.latest() == (5, {"step": 5, "again": True}) and manager.steps() == [3, 4, 5]
    rows = json.loads((tmp_path / "ckpt" / METADATA).read_text())["checkpoints"]
    assert [r["step"] for r in rows] == [3, 4, 5]
    for row in rows:
        path = tmp_path / "ckpt" / row["path"]
        assert path.is_file() and row["size"] == path.stat().st_size
        assert datetime.fromisoformat(row["time"]).tzinfo is not None
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted(
        [METADATA, *(r["path"] for r in rows)]
    )  # nothing else: no temp file, no rotated checkpoint


def test_a_lower_step_just_saved_is_not_rotated_away(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", keep=2)
    manager.save("a", 5)
    manager.save("b", 6)
    path = manager.save("restart", 0)  # a trial that starts over below the steps on disk
    assert path.is_file() and manager.load(0) == "restart"
    assert manager.steps() == [0, 6]


def test_trial_directory_is_the_original_trials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CHECKPOINT_DIR_ENV, raising=False)
    study = optuna.create_study(study_name="s/1")
    first = study.ask()
    s_1 = safe_name("s/1")  # "s_1-<hash>": "s 1" gets another directory
    assert s_1.startswith("s_1-") and s_1 != safe_name("s 1")
    assert checkpoints(first).directory == Path(f"checkpoints/{s_1}/trial-0")
    study.enqueue_trial({}, user_attrs={"optguard.retry_of": 0})
    retry = study.ask()
    assert retry.number == 1 and checkpoints(retry).directory == Path(f"checkpoints/{s_1}/trial-0")
    monkeypatch.setenv(CHECKPOINT_DIR_ENV, str(tmp_path / "elsewhere"))
    assert checkpoints(first).directory == tmp_path / "elsewhere" / s_1 / "trial-0"
    assert checkpoints(first, root="r").directory == Path(f"r/{s_1}/trial-0")


_KILLED_MID_SAVE = r"""
import sys, time
from optguard.checkpointing import CheckpointManager

class Blocks:
    def __reduce__(self):
        print("inside", flush=True)  # the 50 MB before it are already in the temp file
        time.sleep(60)
        return (int, ())

manager = CheckpointManager(sys.argv[1])
manager.save({"step": 1}, 1)
manager.save({"payload": b"b" * 50_000_000, "then": Blocks()}, 2)
"""


def test_kill_during_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_MID_SAVE, str(directory)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "inside\n"
        (partial,) = _tmp_files(directory)
        assert partial.stat().st_size > 10_000_000  # mid-save of a big object
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    manager = CheckpointManager(directory)
    assert manager.latest() == (1, {"step": 1}) and manager.steps() == [1]
    manager.save({"step": 2}, 2)  # the next save removes what the killed process left
    assert _tmp_files(directory) == [] and manager.latest() == (2, {"step": 2})


_DISK_FULL = r"""
import resource, signal, sys
from optguard.checkpointing import CheckpointManager
from optguard.errors import CheckpointError

manager = CheckpointManager(sys.argv[1])
manager.save({"step": 1}, 1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY))
try:
    manager.save(b"x" * 5_000_000, 2)
except CheckpointError as exc:
    print(f"CheckpointError: {exc}")
"""


def test_disk_full_raises_and_keeps_previous(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    result = subprocess.run(
        [sys.executable, "-c", _DISK_FULL, str(directory)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("CheckpointError: cannot save checkpoint of step 2 in ")
    assert "File too large" in result.stdout
    assert _tmp_files(directory) == []
    assert CheckpointManager(directory).latest() == (1, {"step": 1})


def test_unwritable_directory_raises_and_keeps_previous(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match="cannot save checkpoint of step 0 in "):
        CheckpointManager(blocker / "trial-0").save({"step": 0}, 0)  # parent is a regular file
    if os.geteuid() == 0:
        pytest.skip("root writes to a read-only directory; the cases above cover root")
    manager = CheckpointManager(tmp_path / "ckpt")
    manager.save({"step": 1}, 1)
    manager.directory.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match="Permission denied"):
            manager.save({"step": 2}, 2)
    finally:
        manager.directory.chmod(0o700)
    assert manager.latest() == (1, {"step": 1}) and _tmp_files(manager.directory) == []


# -- through optguard run / optguard worker ------------------------------------------------------
def _run_args(study: str, fn: str, *extra: str) -> list[str]:
    return ["run", "--study", study, "--objective", objective(TARGET.format(fn)),
            "--pruner", "none", "--workers", "1", *extra]  # fmt: skip


def _popen(cwd: Path, args: list[str], **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "optguard", *args], cwd=cwd, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env},
    )  # fmt: skip


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def _trial_dir(cwd: Path, study: str, number: int = 0) -> Path:
    return cwd / "checkpoints" / study / f"trial-{number}"


def _wait_steps(directory: Path, step: int) -> None:
    deadline = time.monotonic() + 60
    manager = CheckpointManager(directory)
    while time.monotonic() < deadline:
        if any(s >= step for s in manager.steps()):
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of step {step} in {directory}")


def _assert_emergency_saved(cwd: Path, study: str, reason: str, enforcement: str) -> None:
    (trial, *_) = load_trials(sqlite_url(cwd), study)
    assert trial.state == TrialState.PRUNED, trial.user_attrs
    assert trial.user_attrs["optguard.reason"] == reason
    assert trial.user_attrs["optguard.enforcement"] == enforcement
    assert "optguard.hard_kill" not in trial.user_attrs
    step, saved = CheckpointManager(_trial_dir(cwd, study)).latest() or (None, None)
    assert saved == {"step": step, "emergency": True}
    if trial.intermediate_values:
        assert step in (max(trial.intermediate_values), max(trial.intermediate_values) + 1)
    assert "Emergency checkpoint callback looping.<locals>.emergency done in " in log_text(cwd)


@pytest.mark.scenario
def test_emergency_checkpoint_on_cancel(tmp_path: Path, study_name: str) -> None:
    proc = _popen(tmp_path, _run_args(study_name, "looping", "--n-trials", "3"))
    _wait_steps(_trial_dir(tmp_path, study_name), 3)
    assert run_cli("cancel", "--study", study_name, cwd=tmp_path).returncode == 0
    _, err = _finish(proc)
    assert proc.returncode == 130, err  # cancelled: the study does not have its trials
    _assert_emergency_saved(tmp_path, study_name, "cancelled", "check")


@pytest.mark.scenario
def test_emergency_checkpoint_on_sigterm_to_supervisor(tmp_path: Path, study_name: str) -> None:
    proc = _popen(tmp_path, _run_args(study_name, "looping", "--n-trials", "3"))
    _wait_steps(_trial_dir(tmp_path, study_name), 3)
    proc.send_signal(signal.SIGTERM)
    _, err = _finish(proc)
    assert proc.returncode == 130, err
    _assert_emergency_saved(tmp_path, study_name, "cancelled", "check")


@pytest.mark.scenario
def test_emergency_checkpoint_on_sigterm_to_worker(tmp_path: Path, study_name: str) -> None:
    """A scheduler's SIGTERM to a worker that never checks: the trial ends at once."""
    url = sqlite_url(tmp_path)
    optuna.create_study(study_name=study_name, storage=url)
    proc = _popen(
        tmp_path,
        ["worker", "--study", study_name, "--objective", objective(TARGET.format("looping")),
         "--n-trials", "1", "--storage", url],
        CKPT_TEST_CHECKS="0",
    )  # fmt: skip
    _wait_steps(_trial_dir(tmp_path, study_name), 3)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = _finish(proc)
    assert proc.returncode == 0, err
    assert time.monotonic() - sent < 5  # prompt: not at a check, there is none
    _assert_emergency_saved(tmp_path, study_name, "interrupted", "interrupt")


GUARD = ["--n-trials", "1", "--timeout", "1", "--grace", "0.5", "--kill-after", "0.5"]


@pytest.mark.scenario
def test_supervisor_holds_the_kill_while_callbacks_run(tmp_path: Path, study_name: str) -> None:
    """The callback takes 2 s, four times --kill-after: the worker must not be killed."""
    args = _run_args(study_name, "looping", *GUARD, "--checkpoint-budget", "5")
    proc = _popen(tmp_path, args, CKPT_TEST_CHECKS="0", CKPT_TEST_CALLBACK_S="2")
    _, err = _finish(proc)
    assert proc.returncode == 0, err
    _assert_emergency_saved(tmp_path, study_name, "timeout", "interrupt")
    assert "killing worker pid" not in log_text(tmp_path)


@pytest.mark.scenario
def test_overrunning_callback_is_abandoned(tmp_path: Path, study_name: str) -> None:
    args = _run_args(study_name, "looping", *GUARD, "--checkpoint-budget", "1")
    started = time.monotonic()
    proc = _popen(tmp_path, args, CKPT_TEST_CHECKS="0", CKPT_TEST_CALLBACK_S="60")
    _, err = _finish(proc)
    assert proc.returncode == 0, err
    assert time.monotonic() - started < 20
    log = log_text(tmp_path)
    assert "Emergency checkpoint callback looping.<locals>.emergency overran the 1s budget: " \
           "abandoned" in log  # fmt: skip
    (trial,) = load_trials(sqlite_url(tmp_path), study_name)
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["optguard.enforcement"] == "interrupt"
    _, saved = CheckpointManager(_trial_dir(tmp_path, study_name)).latest() or (None, None)
    assert saved is not None and saved["emergency"] is False  # the callback never saved


@pytest.mark.scenario
def test_retry_resumes_from_the_killed_trials_checkpoint(tmp_path: Path, study_name: str) -> None:
    guard = ["--timeout", "1", "--grace", "1", "--kill-after", "1"]
    first = run_cli(*_run_args(study_name, "resumable", "--n-trials", "1", *guard), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (killed,) = load_trials(sqlite_url(tmp_path), study_name)
    assert killed.state == TrialState.PRUNED and killed.user_attrs["optguard.hard_kill"] is True
    assert killed.user_attrs["resumed_from"] is None
    assert CheckpointManager(_trial_dir(tmp_path, study_name)).steps() == [0, 1, 2]

    (tmp_path / "fixed").touch()
    again = run_cli(
        *_run_args(study_name, "resumable", "--n-trials", "2", "--retry-pruned", "timeout"),
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr
    _, retry = load_trials(sqlite_url(tmp_path), study_name)
    assert retry.user_attrs["optguard.retry_of"] == 0 and retry.state == TrialState.COMPLETE
    assert retry.user_attrs["resumed_from"] == 2 and retry.params == killed.params
    manager = CheckpointManager(_trial_dir(tmp_path, study_name))
    assert manager.steps() == [1, 2, 3, 4, 5]  # keep=5: step 0 rotated out
    assert manager.latest() == (5, {"step": 5, "x": killed.params["x"]})
    assert not _trial_dir(tmp_path, study_name, 1).exists()


# -- optguard checkpoints prune -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("direction", "removed", "kept"),
    [("minimize", "#0, #3, #7", "#1, #2"), ("maximize", "#1, #2, #7", "#3, #0")],
)
def test_prune_keeps_the_best_and_busy(
    tmp_path: Path, study_name: str, direction: str, removed: str, kept: str
) -> None:
    url = sqlite_url(tmp_path)
    study = optuna.create_study(study_name=study_name, storage=url, direction=direction)
    for value in (3.0, 1.0, 2.0, 5.0):  # #0-#3
        study.add_trial(create_trial(value=value))
    study.add_trial(create_trial(state=TrialState.PRUNED))  # #4, its retry is queued
    study.ask()  # #5 RUNNING
    study.enqueue_trial({}, user_attrs={"optguard.retry_of": 4})  # #6 WAITING, uses trial-4/
    study.add_trial(create_trial(state=TrialState.FAIL))  # #7
    root = tmp_path / "ck"
    for number in (0, 1, 2, 3, 4, 5, 7):
        CheckpointManager(root / study_name / f"trial-{number}").save(b"x" * 1_000_000, 0)
    result = run_cli("checkpoints", "prune", "--study", study_name, "--storage", url,
                     "--keep-best", "2", "--checkpoint-dir", str(root), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"optguard: freed 3.0 MB in {root / study_name}/: removed trial(s) {removed}; "
        f"kept best {kept}; left running/queued #4, #5\n"
    )
    left = sorted(p.name for p in (root / study_name).iterdir())
    expected = {"minimize": [1, 2, 4, 5], "maximize": [0, 3, 4, 5]}[direction]
    assert left == [f"trial-{n}" for n in expected]


def test_prune_bad_input(tmp_path: Path, study_name: str) -> None:
    result = run_cli("checkpoints", "prune", "--study", "nope", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("optguard: error: no study named")
    optuna.create_study(study_name=study_name, storage=sqlite_url(tmp_path))
    result = run_cli(
        "checkpoints", "prune", "--study", study_name, "--keep-best", "-1", cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr == "optguard: error: --keep-best must be a whole number >= 0, got -1\n"
    result = run_cli(*_run_args(study_name, "looping", "--checkpoint-budget", "soon"), cwd=tmp_path)
    assert result.returncode == 2 and "--checkpoint-budget" in result.stderr


@pytest.mark.scenario
def test_checkpointed_torch_example(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    target = str(REPO / "scripts/examples/checkpointed_train.py:objective")
    args = ["run", "--study", "ck", "--objective", target, "--n-trials", "1", "--pruner", "none"]
    result = run_cli(*args, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    (trial,) = load_trials(sqlite_url(tmp_path), "ck")
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["resumed_from"] is None
    manager = CheckpointManager(_trial_dir(tmp_path, "ck"))
    assert [p.suffix for p in map(manager.path, manager.steps())] == [".pt", ".pt"]  # keep=2
    step, state = manager.latest() or (None, None)
    assert step == 64 and set(state) == {"model", "opt"}  # 4 epochs of 16 batches
