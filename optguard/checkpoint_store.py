"""Checkpoints in the artifact store (``--checkpoint-store artifacts``): a retry resumes on any
host that can reach the store, not only on the one whose ``--checkpoint-dir`` holds the files.

Every save is uploaded and recorded on the running trial as an Optuna artifact named
``checkpoint-step-<N>.<pkl|pt>`` (so optuna-dashboard lists it with the trial). A retry finds
the checkpoints through the storage: the artifacts of every trial of its series (the original,
``optguard.retry_of``, and the retries of it) in the same study. The store holds the files and
the storage the records of every upload: a record whose file was rotated away is skipped.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Iterable

from optguard.artifacts import ARTIFACTS_ATTR_PREFIX, record_artifact
from optguard.errors import CheckpointError, UsageError

if TYPE_CHECKING:
    import optuna
    from optuna.artifacts import FileSystemArtifactStore

__all__ = ["ArtifactCheckpoints", "Remote", "artifact_name", "new_artifact_id", "remote_of_trial"]

MIMETYPE = "application/octet-stream"
_NAME = re.compile(r"^checkpoint-step-(\d+)\.(pkl|pt)$")


def artifact_name(step: int, suffix: str) -> str:
    """The file name a checkpoint of ``step`` has in the store and in optuna-dashboard."""
    return f"checkpoint-step-{step}.{suffix}"


def new_artifact_id() -> str:
    """A uuid-shaped id that starts with the time in ns: one trial's uploads sort in the order
    they were made (the storage returns a trial's attributes in no set order)."""
    return str(uuid.UUID(int=time.time_ns() << 64 | int.from_bytes(os.urandom(8), "big")))


@dataclass(frozen=True)
class Remote:
    """One checkpoint artifact: its id in the store, its step, and who uploaded it."""

    artifact_id: str
    step: int
    suffix: str  # "pkl" or "pt": how to read it
    trial: int  # number of the trial that uploaded it: a later trial's copy of a step wins


def _remotes(number: int, system_attrs: dict[str, Any]) -> list[Remote]:
    """The checkpoint artifacts among a trial's system attributes (not the guard's evidence)."""
    found = []
    for key, value in system_attrs.items():
        if not key.startswith(ARTIFACTS_ATTR_PREFIX):
            continue
        try:
            meta = json.loads(value)
            match = _NAME.match(meta["filename"])
            artifact_id = meta["artifact_id"]
        except (TypeError, ValueError, KeyError):
            continue  # someone else's attribute under the prefix: not ours to read
        if match is not None and isinstance(artifact_id, str):
            found.append(Remote(artifact_id, int(match.group(1)), match.group(2), number))
    return found


class ArtifactCheckpoints:
    """The checkpoint artifacts of one series of trials (an original and its retries) in one
    study, and uploads of the running trial's. Reads only what the storage and store hold, so
    another process or host sees the same."""

    def __init__(
        self,
        store: "FileSystemArtifactStore",
        where: str,
        storage: "optuna.storages.BaseStorage",
        study_id: int,
        trial_id: int,
        number: int,
        original: int,
    ) -> None:
        self.store = store
        self.where = where  # the store, as error messages name it
        self.storage = storage
        self.study_id = study_id
        self.trial_id = trial_id
        self.number = number
        self.original = original
        self._others: list[Remote] | None = None  # finished trials of the series: read once
        self._gone: set[str] = set()  # ids whose file is known removed: never looked up again
        self._present: set[str] = set()  # ids known to have a file

    def __repr__(self) -> str:
        return f"ArtifactCheckpoints({self.where!r}, trial={self.number}, of={self.original})"

    # -- reading -----------------------------------------------------------------------------
    def _series(self) -> list[Remote]:
        """Every checkpoint artifact recorded for the series, this trial's read afresh (a second
        manager of the same trial may have saved since)."""
        if self._others is None:
            from optguard.checkpointing import original_number

            trials = self.storage.get_all_trials(self.study_id, deepcopy=False)
            self._others = [
                remote
                for t in trials
                if t.number != self.number
                and original_number(t.number, t.user_attrs) == self.original
                for remote in _remotes(t.number, t.system_attrs)
            ]
        own = _remotes(self.number, self.storage.get_trial_system_attrs(self.trial_id))
        return self._others + own

    def _exists(self, remote: Remote) -> bool:
        from optuna.artifacts.exceptions import ArtifactNotFound

        if remote.artifact_id in self._present:
            return True
        if remote.artifact_id in self._gone:
            return False
        try:
            self.store.open_reader(remote.artifact_id).close()
        except (ArtifactNotFound, ValueError):  # ValueError: an id naming a path outside it
            self._gone.add(remote.artifact_id)  # rotated away; its record stays in the storage
            return False
        except OSError as exc:
            raise CheckpointError(
                f"cannot read the artifact store {self.where}: {exc.strerror or exc}"
            ) from None
        self._present.add(remote.artifact_id)
        return True

    def live(self) -> dict[int, list[Remote]]:
        """Checkpoints whose file is in the store, by step (ascending); the copies of a step
        newest first: the latest trial's, and within one trial the last uploaded."""
        by_step: dict[int, list[Remote]] = {}
        for remote in self._series():
            if self._exists(remote):
                by_step.setdefault(remote.step, []).append(remote)
        for copies in by_step.values():  # ids start with the upload time (new_artifact_id)
            copies.sort(key=lambda r: (r.trial, r.artifact_id), reverse=True)
        return {step: by_step[step] for step in sorted(by_step)}

    def open(self, remote: Remote) -> IO[bytes] | None:
        """A reader of ``remote``'s file, or None if it was removed meanwhile."""
        from optuna.artifacts.exceptions import ArtifactNotFound

        try:
            return self.store.open_reader(remote.artifact_id)
        except ArtifactNotFound:
            self._gone.add(remote.artifact_id)
            self._present.discard(remote.artifact_id)
            return None
        except OSError as exc:
            raise CheckpointError(
                f"cannot read checkpoint {artifact_name(remote.step, remote.suffix)} from the "
                f"artifact store {self.where}: {exc.strerror or exc}"
            ) from None

    # -- writing -----------------------------------------------------------------------------
    def upload(self, path: Path, step: int) -> str:
        """Upload the checkpoint file ``path`` of ``step`` and record it on the running trial.

        The file goes first and its record second (``optuna.artifacts.upload_artifact`` does
        the reverse): a process killed mid-upload leaves no record of a partial file, so a
        retry resumes from the previous step instead of failing on a truncated one.
        """
        from optuna.exceptions import UpdateFinishedTrialError

        artifact_id = new_artifact_id()
        name = artifact_name(step, path.suffix.lstrip("."))
        try:
            with path.open("rb") as fh:
                self.store.write(artifact_id, fh)
        except OSError as exc:
            self._discard(artifact_id)
            raise CheckpointError(
                f"saved step {step} in {path.parent} but cannot upload it to the artifact store "
                f"{self.where}: {exc.strerror or exc}"
            ) from None
        try:
            record_artifact(self.storage, self.trial_id, artifact_id, name, MIMETYPE)
        except UpdateFinishedTrialError:
            self._discard(artifact_id)
            raise CheckpointError(
                f"saved step {step} in {path.parent} but trial {self.number} has finished: "
                "its checkpoint cannot be recorded in the artifact store"
            ) from None
        self._present.add(artifact_id)
        return artifact_id

    def _discard(self, artifact_id: str) -> None:
        """Remove what a failed upload may have left; a store that cannot even do that keeps
        an unrecorded file, which no reader ever looks at."""
        from optuna.artifacts.exceptions import ArtifactNotFound

        try:
            self.store.remove(artifact_id)
        except (ArtifactNotFound, OSError):
            pass  # nothing written, or an unwritable store: an orphan file at worst

    def remove(self, remotes: Iterable[Remote]) -> None:
        """Remove the files of ``remotes`` (rotation); their records stay in the storage."""
        from optuna.artifacts.exceptions import ArtifactNotFound

        for remote in remotes:
            try:
                self.store.remove(remote.artifact_id)
            except ArtifactNotFound:
                pass  # removed by another manager of the series meanwhile
            except OSError as exc:
                raise CheckpointError(
                    f"cannot remove old checkpoint {artifact_name(remote.step, remote.suffix)} "
                    f"from the artifact store {self.where}: {exc.strerror or exc}"
                ) from None
            self._present.discard(remote.artifact_id)
            self._gone.add(remote.artifact_id)


def remote_of_trial(
    trial: "optuna.trial.Trial", original: int, directory: str | os.PathLike[str] | None
) -> ArtifactCheckpoints:
    """The artifact checkpoints of ``trial``'s series in the store at ``directory`` (the
    worker's ``--artifacts``, ``$OPTGUARD_ARTIFACT_DIR``, when None)."""
    from optguard.artifacts import ARTIFACT_DIR_ENV, open_store

    where = directory if directory is not None else os.environ.get(ARTIFACT_DIR_ENV)
    if not where:
        raise UsageError(
            "checkpoints in the artifact store need its directory: run the objective under "
            "optguard run --checkpoint-store artifacts, pass artifact_dir or set "
            f"${ARTIFACT_DIR_ENV}"
        )
    try:
        store = open_store(where)
    except OSError as exc:
        raise CheckpointError(
            f"cannot open the artifact store {where}: {exc.strerror or exc}"
        ) from None
    study = trial.study
    return ArtifactCheckpoints(
        store, str(where), study._storage, study._study_id, trial._trial_id, trial.number, original
    )
