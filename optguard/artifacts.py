"""Where optguard keeps Optuna artifacts (``optuna.artifacts``): the guard's evidence of a
trial (memory timeline, log lines) and, with ``--checkpoint-store artifacts``, checkpoints.

A file-system artifact store, next to the storage file by default, so that optuna-dashboard
started with ``--artifact-dir`` on it lists each trial's files. ``--artifacts none`` turns
the evidence off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optguard.urls import journal_path, sqlite_path

if TYPE_CHECKING:
    from optuna.artifacts import FileSystemArtifactStore

__all__ = [
    "ARTIFACTS_ATTR_PREFIX",
    "ARTIFACT_DIR_ENV",
    "CHECKPOINT_STORE_ENV",
    "CHECKPOINT_STORES",
    "DEFAULT_DIR_NAME",
    "artifact_dir",
    "open_store",
    "record_artifact",
]

ARTIFACT_DIR_ENV = "OPTGUARD_ARTIFACT_DIR"  # set in the worker: the store, for the objective
CHECKPOINT_STORE_ENV = "OPTGUARD_CHECKPOINT_STORE"  # set in the worker from --checkpoint-store
CHECKPOINT_STORES = ("local", "artifacts")
DEFAULT_DIR_NAME = "optguard-artifacts"
ARTIFACTS_ATTR_PREFIX = "artifacts:"  # the system attribute optuna.artifacts gives each one


def artifact_dir(url: str, option: str | None) -> Path | None:
    """The artifact store's directory for the storage ``url``: ``option`` when given
    (``none``: no store), else ``optguard-artifacts/`` beside a SQLite or journal file, else
    in the current directory (a database server has no directory of its own)."""
    if option is not None and option.strip().lower() == "none":
        return None
    if option:
        return Path(option).expanduser().absolute()
    path = sqlite_path(url) or journal_path(url)
    base = Path(path).parent if path is not None else Path.cwd()
    return (base / DEFAULT_DIR_NAME).absolute()


def open_store(directory: str | os.PathLike[str]) -> "FileSystemArtifactStore":
    """Optuna's file-system artifact store on ``directory``, created on first use."""
    from optuna.artifacts import FileSystemArtifactStore

    Path(directory).mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(directory))


def record_artifact(
    storage: Any,
    trial_id: int,
    artifact_id: str,
    filename: str,
    mimetype: str,
    key: str | None = None,
) -> None:
    """Record on a RUNNING trial an artifact already written to the store, as
    ``optuna.artifacts.upload_artifact`` records one (``ArtifactMeta``'s fields, what
    optuna-dashboard reads). That function records first and writes second; written first,
    no record ever points at a missing or partial file. ``key``: the system attribute
    (``artifacts:<id>`` by default; the checkpoint store reuses a fixed set of its own)."""
    meta = {
        "artifact_id": artifact_id, "filename": filename, "mimetype": mimetype, "encoding": None
    }
    key = key if key is not None else ARTIFACTS_ATTR_PREFIX + artifact_id
    storage.set_trial_system_attr(trial_id, key, json.dumps(meta))
