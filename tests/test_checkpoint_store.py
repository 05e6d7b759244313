"""Checkpoints through the artifact store (``--checkpoint-store artifacts``, issue 13).

A real ``FileSystemArtifactStore`` and a real SQLite study; the scenario runs ``optguard run``
twice, the retry under another host name (``unshare -u``) with an empty ``--checkpoint-dir``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.artifacts import download_artifact, get_all_artifact_meta
from optuna.trial import TrialState

from conftest import load_trials, objective, run_cli, sqlite_url
from optguard.artifacts import ARTIFACT_DIR_ENV, CHECKPOINT_STORE_ENV, open_store
from optguard.checkpointing import METADATA, CheckpointManager, checkpoints
from optguard.errors import CheckpointError, UsageError
from optguard.logs import safe_name

PREFIX = "checkpoint-step-"


def _study(tmp_path: Path, name: str) -> optuna.Study:
    return optuna.create_study(study_name=name, storage=sqlite_url(tmp_path))


def _names(trial: optuna.trial.FrozenTrial, storage: object) -> list[str]:
    """The checkpoint artifacts recorded on ``trial``, by file name."""
    metas = get_all_artifact_meta(trial, storage=storage)  # type: ignore[arg-type]
    return sorted(m.filename for m in metas if m.filename.startswith(PREFIX))


def _manager(trial: optuna.Trial, tmp_path: Path, root: str, keep: int = 2) -> CheckpointManager:
    return checkpoints(trial, keep=keep, root=tmp_path / root, store="artifacts",
                       artifact_dir=tmp_path / "art")  # fmt: skip


def _retry_of(study: optuna.Study, original: optuna.Trial) -> optuna.Trial:
    study.tell(original, state=TrialState.PRUNED)
    study.enqueue_trial({}, user_attrs={"optguard.retry_of": original.number})
    return study.ask()


# -- the manager ----------------------------------------------------------------------------------
def test_every_save_is_uploaded_and_recorded(tmp_path: Path, study_name: str) -> None:
    study = _study(tmp_path, study_name)
    trial = study.ask()
    manager = _manager(trial, tmp_path, "A")
    for step in range(4):
        manager.save({"step": step}, step)
    assert manager.steps() == [2, 3] and manager.latest() == (3, {"step": 3})
    frozen = study.trials[0]
    assert _names(frozen, study._storage) == [f"{PREFIX}{n}.pkl" for n in range(4)]
    assert len(os.listdir(tmp_path / "art")) == 2  # rotated in the store too; records stay
    (newest,) = [m for m in get_all_artifact_meta(frozen, storage=study._storage)
                 if m.filename == f"{PREFIX}3.pkl"]  # fmt: skip
    got = tmp_path / "got.pkl"
    store = open_store(tmp_path / "art")
    download_artifact(artifact_store=store, artifact_id=newest.artifact_id, file_path=str(got))
    assert pickle.loads(got.read_bytes()) == {"step": 3}
    manager.save({"step": 3, "again": True}, 3)  # the same step: its older upload goes
    assert len(os.listdir(tmp_path / "art")) == 2
    assert manager.latest() == (3, {"step": 3, "again": True})


def test_retry_with_an_empty_directory_resumes_from_the_store(
    tmp_path: Path, study_name: str
) -> None:
    study = _study(tmp_path, study_name)
    original = study.ask()
    for step in range(5):
        _manager(original, tmp_path, "A", keep=3).save({"step": step}, step)
    retry = _retry_of(study, original)
    manager = _manager(retry, tmp_path, "B", keep=3)
    assert manager.directory == tmp_path / "B" / safe_name(study_name) / "trial-0"
    assert not manager.directory.exists()  # another host: nothing local
    assert manager.steps() == [2, 3, 4]
    assert manager.latest() == (4, {"step": 4})  # downloaded into the cache
    assert [p.name for p in manager.directory.iterdir()] == ["step-000000004.pkl"]
    assert manager.load(2) == {"step": 2}
    manager.save({"step": 5}, 5)  # the retry's rotation removes the original's oldest upload
    assert manager.steps() == [3, 4, 5]
    assert _names(study.trials[1], study._storage) == [f"{PREFIX}5.pkl"]
    assert len(os.listdir(tmp_path / "art")) == 3
    later = _manager(original, tmp_path, "A", keep=3)  # on the first host: its cache too
    assert later.steps() == [2, 3, 4, 5] and later.latest() == (5, {"step": 5})
    assert _manager(study.ask(), tmp_path, "B").steps() == []  # another series: none of these


def test_a_record_whose_file_is_gone_is_skipped(tmp_path: Path, study_name: str) -> None:
    study = _study(tmp_path, study_name)
    original = study.ask()
    first = _manager(original, tmp_path, "A")
    first.save({"step": 0}, 0)
    first.save({"step": 1}, 1)
    retry = _retry_of(study, original)
    metas = get_all_artifact_meta(study.trials[0], storage=study._storage)
    (newest,) = [m for m in metas if m.filename == f"{PREFIX}1.pkl"]
    open_store(tmp_path / "art").remove(newest.artifact_id)  # lost, or rotated by someone
    manager = _manager(retry, tmp_path, "B")
    assert manager.steps() == [0] and manager.latest() == (0, {"step": 0})
    assert manager.path(1) is None
    with pytest.raises(CheckpointError, match="no checkpoint of step 1 in "):
        manager.load(1)


_KILLED_MID_UPLOAD = r"""
import sys, time
import optuna
from optuna.artifacts import FileSystemArtifactStore
from optguard.checkpointing import checkpoints

url, name, root, art = sys.argv[1:]
trial = optuna.load_study(study_name=name, storage=url).ask()
manager = checkpoints(trial, root=root, store="artifacts", artifact_dir=art)
manager.save({"step": 0}, 0)

def half_then_hang(self, artifact_id, body):
    with open(self._get_filepath(artifact_id), "wb") as fh:
        fh.write(body.read(10))  # the first bytes of the pickle: a truncated file
    print("inside", flush=True)
    time.sleep(60)

FileSystemArtifactStore.write = half_then_hang
manager.save({"step": 1, "payload": b"x" * 1000}, 1)
"""


def test_a_kill_mid_upload_leaves_no_record(tmp_path: Path, study_name: str) -> None:
    study = _study(tmp_path, study_name)
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_MID_UPLOAD, sqlite_url(tmp_path), study_name,
         str(tmp_path / "A"), str(tmp_path / "art")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline() == "inside\n"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    assert len(os.listdir(tmp_path / "art")) == 2  # step 0, and half of step 1
    (killed,) = study.trials
    assert _names(killed, study._storage) == [f"{PREFIX}0.pkl"]  # no record of the half
    study._storage.set_trial_state_values(killed._trial_id, TrialState.PRUNED)  # reaped
    study.enqueue_trial({}, user_attrs={"optguard.retry_of": 0})
    assert _manager(study.ask(), tmp_path, "B").latest() == (0, {"step": 0})


def test_unwritable_store_raises_one_line(tmp_path: Path, study_name: str) -> None:
    study = _study(tmp_path, study_name)
    trial = study.ask()
    manager = _manager(trial, tmp_path, "A")
    manager.save({"step": 0}, 0)
    shutil.rmtree(tmp_path / "art")
    (tmp_path / "art").write_text("")  # a file where the store was: no root bypasses that
    with pytest.raises(CheckpointError) as raised:
        manager.save({"step": 1}, 1)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("saved step 1 in ")
    assert f"cannot upload it to the artifact store {tmp_path / 'art'}: Not a directory" in message
    assert CheckpointManager(manager.directory).steps() == [0, 1]  # the local save stands
    rows = json.loads((manager.directory / METADATA).read_text())["checkpoints"]
    assert [row["step"] for row in rows] == [0, 1]  # and the local side was tidied
    assert _names(study.trials[0], study._storage) == [f"{PREFIX}0.pkl"]  # no record of it
    with pytest.raises(CheckpointError, match="^cannot open the artifact store .*: File exists$"):
        _manager(trial, tmp_path, "A")


def test_upload_after_the_trial_finished_raises(tmp_path: Path, study_name: str) -> None:
    study = _study(tmp_path, study_name)
    trial = study.ask()
    manager = _manager(trial, tmp_path, "A")
    study.tell(trial, 1.0)
    with pytest.raises(CheckpointError, match=r"trial 0 has finished: its checkpoint cannot be"):
        manager.save({"step": 0}, 0)
    assert os.listdir(tmp_path / "art") == []


def test_store_comes_from_the_worker_environment(
    tmp_path: Path, study_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    trial = _study(tmp_path, study_name).ask()
    monkeypatch.delenv(CHECKPOINT_STORE_ENV, raising=False)
    monkeypatch.delenv(ARTIFACT_DIR_ENV, raising=False)
    assert checkpoints(trial, root=tmp_path).remote is None  # local by default
    with pytest.raises(UsageError, match=r"need its directory: .*\$OPTGUARD_ARTIFACT_DIR"):
        checkpoints(trial, root=tmp_path, store="artifacts")
    with pytest.raises(UsageError, match="must be one of local, artifacts, got 's3'"):
        checkpoints(trial, root=tmp_path, store="s3")
    monkeypatch.setenv(CHECKPOINT_STORE_ENV, "artifacts")
    monkeypatch.setenv(ARTIFACT_DIR_ENV, str(tmp_path / "art"))
    manager = checkpoints(trial, root=tmp_path)
    assert manager.remote is not None and manager.remote.where == str(tmp_path / "art")
    assert checkpoints(trial, root=tmp_path, store="local").remote is None


# -- through optguard run -----------------------------------------------------------------------
TARGET = objective("stored_checkpoints.py:resumable")
KILL = ["--timeout", "1", "--grace", "1", "--kill-after", "1"]


def _run_args(study: str, *extra: str) -> list[str]:
    return ["run", "--study", study, "--objective", TARGET, "--pruner", "none",
            "--workers", "1", *extra]  # fmt: skip


def _on_other_host(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m optguard ARGS`` in a UTS namespace whose host name is ``otherhost``."""
    command = " ".join(["exec", sys.executable, "-m", "optguard", *args])
    return subprocess.run(
        ["unshare", "-u", "sh", "-c", f"hostname otherhost && {command}"],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _can_unshare() -> bool:
    try:
        probe = subprocess.run(["unshare", "-u", "sh", "-c", "hostname otherhost"],
                               capture_output=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False  # no unshare(1) here
    return probe.returncode == 0


@pytest.mark.scenario
def test_retry_on_another_host_resumes_from_the_killed_trials_upload(
    tmp_path: Path, study_name: str
) -> None:
    if not _can_unshare():
        pytest.skip("unshare -u (a UTS namespace) is not permitted here")
    store = ["--checkpoint-store", "artifacts", "--artifacts", str(tmp_path / "art")]
    first = run_cli(*_run_args(study_name, "--n-trials", "1", *KILL, *store,
                               "--checkpoint-dir", str(tmp_path / "A")), cwd=tmp_path)  # fmt: skip
    assert first.returncode == 0, first.stderr
    (killed,) = load_trials(sqlite_url(tmp_path), study_name)
    assert killed.state == TrialState.PRUNED and killed.user_attrs["optguard.hard_kill"] is True
    assert killed.user_attrs["resumed_from"] is None

    (tmp_path / "fixed").touch()
    args = _run_args(study_name, "--n-trials", "2", "--retry-pruned", "timeout", *store,
                     "--checkpoint-dir", str(tmp_path / "B"))  # fmt: skip
    again = _on_other_host(args, tmp_path)
    assert again.returncode == 0, again.stderr
    _, retry = load_trials(sqlite_url(tmp_path), study_name)
    assert retry.user_attrs["optguard.retry_of"] == 0 and retry.state == TrialState.COMPLETE
    assert retry.user_attrs["host"] == "otherhost" != killed.user_attrs["host"]
    assert retry.user_attrs["resumed_from"] == 2
    assert retry.user_attrs["resumed_state"] == {
        "step": 2, "x": killed.params["x"], "host": killed.user_attrs["host"]
    }  # what the killed trial saved, on its host
    cache = tmp_path / "B" / safe_name(study_name) / "trial-0"
    assert CheckpointManager(cache).steps() == [4, 5]  # keep=2; step 2 was downloaded, rotated
    storage = optuna.storages.get_storage(sqlite_url(tmp_path))
    assert _names(retry, storage) == [f"{PREFIX}{n}.pkl" for n in (3, 4, 5)]


@pytest.mark.scenario
def test_without_checkpoint_store_nothing_is_uploaded(tmp_path: Path, study_name: str) -> None:
    (tmp_path / "fixed").touch()
    args = _run_args(study_name, "--n-trials", "1", "--artifacts", str(tmp_path / "art"))
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (trial,) = load_trials(sqlite_url(tmp_path), study_name)
    assert trial.state == TrialState.COMPLETE
    local = tmp_path / "checkpoints" / safe_name(study_name) / "trial-0"
    assert CheckpointManager(local).steps() == [1, 2]
    storage = optuna.storages.get_storage(sqlite_url(tmp_path))
    assert _names(trial, storage) == []
    recorded = {m.artifact_id for m in get_all_artifact_meta(trial, storage=storage)}
    stored = set(os.listdir(tmp_path / "art")) if (tmp_path / "art").exists() else set()
    assert stored <= recorded  # only the guard's evidence, if any
