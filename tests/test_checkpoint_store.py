"""Checkpoints through the artifact store (``--checkpoint-store artifacts``, issue 13).

A real ``FileSystemArtifactStore`` and a real SQLite study; the scenario runs ``optguard run``
twice, the retry under another host name (``unshare -u``) with an empty ``--checkpoint-dir``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import optuna
import pytest
from optuna.artifacts import download_artifact, get_all_artifact_meta, upload_artifact
from optuna.trial import TrialState

from conftest import load_trials, objective, run_cli, sqlite_url
from optguard.artifacts import ARTIFACT_DIR_ENV, CHECKPOINT_STORE_ENV, open_store
from optguard.checkpoint_store import (
    KEY_PREFIX,
    ArtifactCheckpoints,
    new_artifact_id,
    record_key,
)
from optguard.checkpointing import METADATA, CheckpointManager, checkpoints
from optguard.errors import CheckpointError, StorageError, UsageError
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


def _stored(study: optuna.Study, tmp_path: Path, step: int) -> list[object]:
    """What the store holds for ``step`` of trial 0, read as another host would: every
    recorded copy whose file is there, unpickled."""
    store, found = open_store(tmp_path / "art"), []
    for meta in get_all_artifact_meta(study.trials[0], storage=study._storage):
        uid = meta.artifact_id
        if meta.filename == f"{PREFIX}{step}.pkl" and (tmp_path / "art" / uid).exists():
            got = tmp_path / f"got-{uid}"
            download_artifact(artifact_store=store, artifact_id=uid, file_path=str(got))
            found.append(pickle.loads(got.read_bytes()))
    return found


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
    assert _names(frozen, study._storage) == [f"{PREFIX}{n}.pkl" for n in (1, 2, 3)]  # 3 slots
    assert len(os.listdir(tmp_path / "art")) == 2  # rotated in the store too
    assert _stored(study, tmp_path, 3) == [{"step": 3}]
    manager.save({"step": 3, "again": True}, 3)  # the same step: its older upload goes
    assert len(os.listdir(tmp_path / "art")) == 2
    assert manager.latest() == (3, {"step": 3, "again": True})
    assert _stored(study, tmp_path, 3) == [{"step": 3, "again": True}]  # what a retry gets
    elsewhere = _manager(trial, tmp_path, "B")  # another host: an empty cache
    assert elsewhere.latest() == (3, {"step": 3, "again": True})
    assert elsewhere.load(2) == {"step": 2}


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
    assert sorted(p.name for p in manager.directory.iterdir()) == [METADATA, "step-000000004.pkl"]
    assert manager.load(2) == {"step": 2}
    manager.save({"step": 5}, 5)  # the retry's rotation removes the original's oldest upload
    assert manager.steps() == [3, 4, 5]
    assert _names(study.trials[1], study._storage) == [f"{PREFIX}5.pkl"]
    assert len(os.listdir(tmp_path / "art")) == 3
    later = _manager(original, tmp_path, "A", keep=3)  # the first host: its cache of step 2
    assert later.steps() == [3, 4, 5] and later.latest() == (5, {"step": 5})  # is no step
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
import shutil
from optguard.checkpointing import checkpoints

url, name, root, art = sys.argv[1:]
trial = optuna.load_study(study_name=name, storage=url).ask()
manager = checkpoints(trial, root=root, store="artifacts", artifact_dir=art)
manager.save({"step": 0}, 0)

def half_then_hang(src, dst, *args):
    dst.write(src.read(10))  # the first bytes of the pickle: a truncated file
    dst.flush()
    print("inside", flush=True)
    time.sleep(60)

shutil.copyfileobj = half_then_hang  # the upload's copy into the store
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
    stored = sorted(os.listdir(tmp_path / "art"))  # step 0, and half of step 1 under a temp
    assert len(stored) == 2 and stored[0].startswith(".tmp-")  # name: never under an id
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


def _keys(study: optuna.Study, trial: optuna.Trial) -> list[str]:
    """The optguard checkpoint record keys on ``trial``."""
    attrs = study._storage.get_trial_system_attrs(trial._trial_id)
    return sorted(k for k in attrs if k.startswith(KEY_PREFIX))


def test_a_foreign_cache_is_never_resumed_from_nor_rotates_uploads(
    tmp_path: Path, study_name: str
) -> None:
    old = _study(tmp_path, study_name)
    stale = _manager(old.ask(), tmp_path, "A", keep=5)
    for step in range(10):
        stale.save({"study": "old", "step": step}, step)
    optuna.delete_study(study_name=study_name, storage=sqlite_url(tmp_path))
    study = _study(tmp_path, study_name)  # the same name again: the same trial-0 directory
    trial = study.ask()
    here = _manager(trial, tmp_path, "A", keep=5)
    assert here.directory == stale.directory
    assert here.latest() is None and here.steps() == []  # not a retry: nothing to resume
    elsewhere = _manager(trial, tmp_path, "B", keep=5)
    for step in range(4):
        elsewhere.save({"study": "new", "step": step}, step)
    # The old study's step 3 lies in A's cache under the same name: the upload wins.
    assert here.latest() == (3, {"study": "new", "step": 3})
    for step in range(4):
        here.save({"study": "new", "step": step, "on": "A"}, step)
    assert here.steps() == [0, 1, 2, 3]  # the stale steps 4..9 pushed none of them out
    assert _manager(trial, tmp_path, "C", keep=5).load(0) == {"study": "new", "step": 0, "on": "A"}
    assert CheckpointManager(here.directory).steps() == [0, 1, 2, 3]  # and the stale cache went


def test_an_unreadable_upload_gives_way_to_the_next_lower_step(
    tmp_path: Path, study_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    study = _study(tmp_path, study_name)
    original = study.ask()
    first = _manager(original, tmp_path, "A", keep=3)
    for step in range(3):
        first.save({"step": step, "blob": b"x" * 1000}, step)
    (meta,) = [m for m in get_all_artifact_meta(original) if m.filename == f"{PREFIX}2.pkl"]
    stored = tmp_path / "art" / meta.artifact_id
    stored.write_bytes(stored.read_bytes()[:20])  # a torn file in the store
    manager = _manager(_retry_of(study, original), tmp_path, "B", keep=3)
    with caplog.at_level(logging.WARNING, logger="optguard.checkpoints"):
        assert manager.latest() == (1, {"step": 1, "blob": b"x" * 1000})
    assert "step-000000002.pkl is unreadable" in caplog.text
    assert sorted(os.listdir(manager.directory)) == [METADATA, "step-000000001.pkl"]  # dropped
    assert manager.latest()[0] == 1 and manager.steps() == [0, 1]  # that copy is gone for it
    with pytest.raises(CheckpointError, match="no checkpoint of step 2 in "):
        manager.load(2)
    assert stored.exists()  # the store keeps it: another reader decides for itself
    with pytest.raises(CheckpointError, match=r"step-000000002\.pkl is unreadable"):
        _manager(original, tmp_path, "C", keep=3).load(2)


def test_an_unreadable_torch_upload_is_a_checkpoint_error(tmp_path: Path, study_name: str) -> None:
    torch = pytest.importorskip("torch")
    study = _study(tmp_path, study_name)
    original = study.ask()
    first = _manager(original, tmp_path, "A", keep=3)
    for step in range(2):
        first.save({"w": torch.full((100,), float(step))}, step)
    (meta,) = [m for m in get_all_artifact_meta(original) if m.filename == f"{PREFIX}1.pt"]
    stored = tmp_path / "art" / meta.artifact_id
    stored.write_bytes(stored.read_bytes()[:300])
    manager = _manager(_retry_of(study, original), tmp_path, "B", keep=3)
    step, state = manager.latest()
    assert step == 0 and state["w"].tolist() == [0.0] * 100
    with pytest.raises(CheckpointError, match=r"step-000000001\.pt is unreadable"):
        _manager(original, tmp_path, "C", keep=3).load(1)


def test_a_cached_copy_that_cannot_be_read_is_downloaded_again(
    tmp_path: Path, study_name: str
) -> None:
    trial = _study(tmp_path, study_name).ask()
    manager = _manager(trial, tmp_path, "A")
    manager.save({"step": 0}, 0)
    (manager.directory / "step-000000000.pkl").write_bytes(b"\x80")  # the cache rotted
    assert manager.latest() == (0, {"step": 0}) and manager.load(0) == {"step": 0}


def test_storage_errors_become_one_line_and_leave_nothing_half_done(
    tmp_path: Path, study_name: str
) -> None:
    _study(tmp_path, study_name)
    study = optuna.load_study(study_name=study_name, storage=sqlite_url(tmp_path) + "?timeout=0.2")
    trial = study.ask()
    manager = _manager(trial, tmp_path, "A")
    manager.save({"step": 0}, 0)
    lock = sqlite3.connect(tmp_path / "optguard.db", isolation_level=None, timeout=0.1)
    lock.execute("BEGIN EXCLUSIVE")  # another process holds the database
    try:
        with pytest.raises(CheckpointError) as raised:
            manager.save({"step": 1}, 1)
    finally:
        lock.execute("COMMIT")
        lock.close()
    message = str(raised.value)
    assert "\n" not in message and "in the storage: " in message and "locked" in message
    assert len(os.listdir(tmp_path / "art")) == 1  # no orphan upload
    rows = json.loads((manager.directory / METADATA).read_text())["checkpoints"]
    assert [(r["step"], r["artifact_id"] is None) for r in rows] == [(0, False), (1, True)]
    assert _manager(trial, tmp_path, "B").latest() == (0, {"step": 0})

    optuna.delete_study(study_name=study_name, storage=sqlite_url(tmp_path))  # under the trial
    with pytest.raises(CheckpointError, match=r"^cannot .* in the storage: .*\S$"):
        manager.save({"step": 2}, 2)
    with pytest.raises(CheckpointError, match=r"^cannot read the checkpoints of trial 0 in th"):
        manager.latest()
    assert len(os.listdir(tmp_path / "art")) == 1


def test_optguards_own_storage_error_passes_through_after_the_cleanup(
    tmp_path: Path, study_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a worker the storage is down past --storage-outage: the worker stops on that, as
    on any storage call of the objective, rather than failing the trial."""
    study = _study(tmp_path, study_name)
    trial = study.ask()
    manager = _manager(trial, tmp_path, "A")
    manager.save({"step": 0}, 0)

    def down(*args: object) -> None:
        raise StorageError("storage sqlite:///x unreachable for 600s: disk I/O error")

    monkeypatch.setattr(study._storage, "set_trial_system_attr", down)
    with pytest.raises(StorageError, match="unreachable for 600s"):
        manager.save({"step": 1}, 1)
    assert len(os.listdir(tmp_path / "art")) == 1  # no orphan upload
    rows = json.loads((manager.directory / METADATA).read_text())["checkpoints"]
    assert [row["step"] for row in rows] == [0, 1]


def test_records_are_a_fixed_set_of_slots_per_trial(tmp_path: Path, study_name: str) -> None:
    study = _study(tmp_path, study_name)
    trial = study.ask()
    manager = _manager(trial, tmp_path, "A", keep=2)
    for step in range(30):
        manager.save({"step": step}, step)
    tid = trial._trial_id
    assert _keys(study, trial) == [record_key(tid, slot) for slot in range(3)]  # keep + 1
    assert _names(study.trials[0], study._storage) == [f"{PREFIX}{n}.pkl" for n in (27, 28, 29)]
    assert len(os.listdir(tmp_path / "art")) == 2 and manager.steps() == [28, 29]
    second = study.ask()
    unbounded = _manager(second, tmp_path, "A", keep=None)  # type: ignore[arg-type]
    for step in (0, 1, 2, 3, 2):
        unbounded.save({"step": step, "n": len(unbounded.steps())}, step)
    assert len(_keys(study, study.trials[1])) == 4  # one per step; a step saved again: its own
    assert unbounded.steps() == [0, 1, 2, 3] and len(os.listdir(tmp_path / "art")) == 6
    assert _manager(second, tmp_path, "B").load(2) == {"step": 2, "n": 4}


def test_the_users_own_artifacts_are_neither_read_nor_removed(
    tmp_path: Path, study_name: str
) -> None:
    trial = _study(tmp_path, study_name).ask()
    mine = tmp_path / f"{PREFIX}7.pkl"
    mine.write_bytes(pickle.dumps({"my": "dataset split"}))
    store = open_store(tmp_path / "art")
    own = upload_artifact(artifact_store=store, file_path=str(mine), study_or_trial=trial)
    manager = _manager(trial, tmp_path, "A", keep=2)
    assert manager.latest() is None
    for step in range(5):
        manager.save({"step": step}, step)
    assert manager.steps() == [3, 4] and (tmp_path / "art" / own).exists()


@pytest.mark.parametrize("last", ["older", "newer"])
def test_concurrent_saves_of_one_step_keep_one_copy(
    tmp_path: Path, study_name: str, monkeypatch: pytest.MonkeyPatch, last: str
) -> None:
    """Two managers of one trial (the objective's and an emergency callback's) in one
    directory save step 2 at once and record it in the same slot, then rotate; ``last`` is the
    upload whose record lands last: the one that stays, with the bytes its manager saved."""
    trial = _study(tmp_path, study_name).ask()
    managers = {"older": _manager(trial, tmp_path, "A"), "newer": _manager(trial, tmp_path, "A")}
    managers["older"].save({"step": 0}, 0)
    managers["older"].save({"step": 1}, 1)
    ids = {"older": "00000000-0000-4000-8000-000000000001",
           "newer": "00000000-0000-4000-8000-000000000002"}  # fmt: skip
    both_ready, first_done = threading.Barrier(2, timeout=30), threading.Event()
    both_done = threading.Barrier(2, timeout=30)
    call = ArtifactCheckpoints._call

    def in_turn(self: ArtifactCheckpoints, what: str, fn: Callable[[], object]) -> object:
        if not what.startswith("record"):
            return call(self, what, fn)
        both_ready.wait()  # each has read the trial's records: both pick the same free slot
        me = threading.current_thread().name
        if me == last:
            assert first_done.wait(30)
        try:
            return call(self, what, fn)
        finally:
            first_done.set()
            both_done.wait()  # then both rotate

    monkeypatch.setattr("optguard.checkpoint_store.new_artifact_id",
                        lambda: ids[threading.current_thread().name])  # fmt: skip
    monkeypatch.setattr(ArtifactCheckpoints, "_call", in_turn)
    threads = [threading.Thread(target=m.save, args=({"step": 2, "by": who}, 2), name=who)
               for who, m in managers.items()]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    monkeypatch.undo()
    assert _manager(trial, tmp_path, "B").latest() == (2, {"step": 2, "by": last})  # elsewhere
    assert sorted(os.listdir(tmp_path / "art"))[:1] == [ids[last]]  # and no orphan of the other
    assert len(os.listdir(tmp_path / "art")) == 2  # step 1's


def test_a_store_without_the_series_files_warns(
    tmp_path: Path, study_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    study = _study(tmp_path, study_name)
    original = study.ask()
    _manager(original, tmp_path, "A").save({"step": 0}, 0)
    retry = _retry_of(study, original)
    elsewhere = checkpoints(retry, root=tmp_path / "B", store="artifacts",
                            artifact_dir=tmp_path / "other-cwd" / "optguard-artifacts")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="optguard.checkpoints"):
        assert elsewhere.latest() is None and elsewhere.steps() == []
    (record,) = [r for r in caplog.records if r.name == "optguard.checkpoints"]  # once
    assert "records 1 upload(s) but the artifact store" in record.getMessage()
    assert str(tmp_path / "other-cwd" / "optguard-artifacts") in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="optguard.checkpoints"):
        assert _manager(retry, tmp_path, "B").latest() == (0, {"step": 0})
    assert caplog.records == []


@pytest.mark.parametrize(
    "key, meta",
    [
        ("{tid}-9", {"artifact_id": "{uuid}", "filename": PREFIX + "1" * 5000 + ".pkl"}),
        ("{tid}-9", {"artifact_id": "", "filename": f"{PREFIX}7.pkl"}),
        ("{tid}-9", {"artifact_id": ".", "filename": f"{PREFIX}7.pkl"}),
        ("{tid}-9", {"artifact_id": "../optuna.db", "filename": f"{PREFIX}7.pkl"}),
        ("{tid}-9", {"artifact_id": "{uuid}", "filename": f"{PREFIX}\u0667.pkl"}),
        ("{tid}-9", {"artifact_id": "{uuid}", "filename": f"{PREFIX}7.pkl\n"}),
        ("{tid}-9", {"artifact_id": 7, "filename": f"{PREFIX}7.pkl"}),
        ("{tid}-9", None),
        ("{tid}-9", "not json"),
        ("{tid}-" + "9" * 40, {"artifact_id": "{uuid}", "filename": f"{PREFIX}7.pkl"}),
        ("99999-1", {"artifact_id": "{uuid}", "filename": f"{PREFIX}7.pkl"}),
    ],
)
def test_odd_records_are_skipped(
    tmp_path: Path, study_name: str, key: str, meta: object
) -> None:
    study = _study(tmp_path, study_name)
    original = study.ask()
    _manager(original, tmp_path, "A").save({"step": 0}, 0)
    planted = tmp_path / "art" / new_artifact_id()  # a file is there: only the record is odd
    planted.write_bytes(pickle.dumps({"step": 7}))
    if isinstance(meta, dict):
        meta = {k: v.replace("{uuid}", planted.name) if isinstance(v, str) else v
                for k, v in meta.items()}  # fmt: skip
    value = meta if isinstance(meta, str) else json.dumps(meta)
    key = KEY_PREFIX + key.replace("{tid}", str(original._trial_id))
    study._storage.set_trial_system_attr(original._trial_id, key, value)
    manager = _manager(_retry_of(study, original), tmp_path, "B")
    assert manager.latest() == (0, {"step": 0}) and manager.steps() == [0]
    assert planted.exists()


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
