"""Checkpoints in the artifact store (``--checkpoint-store artifacts``): a retry resumes on any
host that can reach the store, not only on the one whose ``--checkpoint-dir`` holds the files.

Every save is uploaded and recorded on the running trial as an Optuna artifact named
``checkpoint-step-<N>.<pkl|pt>`` (so optuna-dashboard lists it with the trial). The records sit
under optguard's own keys, ``artifacts:optguard-ckpt-<trial id>-<slot>``, a fixed set per trial
(``keep`` + 1 slots) that later saves overwrite: a trial's records stay bounded however often
it saves, and the user's own artifacts are never read or removed. A retry finds the
checkpoints through the storage: the records of every trial of its series (the original,
``optguard.retry_of``, and the retries of it) in the same study. A record whose file was
rotated away is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable, TypeVar

from optguard.artifacts import ARTIFACTS_ATTR_PREFIX, record_artifact
from optguard.checkpointing import atomic_write, original_number
from optguard.errors import CheckpointError, StorageError, UsageError

if TYPE_CHECKING:
    import optuna
    from optuna.artifacts import FileSystemArtifactStore

__all__ = [
    "ArtifactCheckpoints",
    "KEY_PREFIX",
    "Remote",
    "artifact_name",
    "new_artifact_id",
    "record_key",
    "remote_of_trial",
]

T = TypeVar("T")
MIMETYPE = "application/octet-stream"
KEY_PREFIX = ARTIFACTS_ATTR_PREFIX + "optguard-ckpt-"  # what marks a record as optguard's
_KEY = re.compile(r"([0-9]{1,18})-([0-9]{1,18})", re.ASCII)  # after KEY_PREFIX
_NAME = re.compile(r"checkpoint-step-([0-9]{1,18})\.(pkl|pt)", re.ASCII)
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.ASCII)

_log = logging.getLogger("optguard.checkpoints")


def artifact_name(step: int, suffix: str) -> str:
    """The file name a checkpoint of ``step`` has in the store and in optuna-dashboard."""
    return f"checkpoint-step-{step}.{suffix}"


def record_key(trial_id: int, slot: int) -> str:
    """The system attribute holding the record of one of a trial's slots."""
    return f"{KEY_PREFIX}{trial_id}-{slot}"


def new_artifact_id() -> str:
    """A uuid-shaped id that starts with the time in ns: one trial's uploads sort in the order
    they were made (the storage returns a trial's attributes in no set order)."""
    return str(uuid.UUID(int=time.time_ns() << 64 | int.from_bytes(os.urandom(8), "big")))


@dataclass(frozen=True)
class Remote:
    """One checkpoint artifact: its id in the store, its step, who uploaded it and where its
    record is."""

    artifact_id: str
    step: int
    suffix: str  # "pkl" or "pt": how to read it
    trial: int  # number of the trial that uploaded it: a later trial's copy of a step wins
    slot: int

    @property
    def order(self) -> tuple[int, str]:
        """Newer copies sort higher: a later trial's, then the later upload (ids start with
        the time)."""
        return self.trial, self.artifact_id


def _remotes(number: int, trial_id: int, system_attrs: dict[str, Any]) -> list[Remote]:
    """The checkpoint records among a trial's system attributes. Only keys of optguard's own
    scheme for this very trial count; a record that does not parse is skipped, not fatal."""
    found = []
    for key, value in system_attrs.items():
        if not key.startswith(KEY_PREFIX):
            continue  # the user's artifacts, the guard's evidence: not ours to read or remove
        match = _KEY.fullmatch(key, len(KEY_PREFIX))
        if match is None or int(match.group(1)) != trial_id:
            continue  # not this trial's key (a copied study's record)
        try:
            meta = json.loads(value)
            name = _NAME.fullmatch(meta["filename"])
            artifact_id = meta["artifact_id"]
            valid = isinstance(artifact_id, str) and _UUID.fullmatch(artifact_id) is not None
        except (TypeError, ValueError, KeyError):
            continue  # an odd record: skipped, the others still resume
        if name is not None and valid:
            step, suffix = int(name.group(1)), name.group(2)
            found.append(Remote(artifact_id, step, suffix, number, int(match.group(2))))
    return found


def _storage_cause(exc: Exception, storage: Any) -> str | None:
    """One line naming a storage failure, or None when ``exc`` is not one."""
    from optguard.outage import describe, is_storage_error

    if isinstance(exc, KeyError):  # the trial or study was deleted meanwhile
        return f"{exc.args[0] if exc.args else 'not found'}"
    if is_storage_error(exc):
        return describe(exc, str(getattr(storage, "url", "") or ""))
    return None


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
        self.where = where  # the store's directory, as error messages name it
        self.storage = storage
        self.study_id = study_id
        self.trial_id = trial_id
        self.number = number
        self.original = original
        self._others: list[Remote] | None = None  # finished trials of the series: read once
        self._gone: set[str] = set()  # ids whose file is removed or unreadable: skipped
        self._present: set[str] = set()  # ids known to have a file
        self._warned = False

    def __repr__(self) -> str:
        return f"ArtifactCheckpoints({self.where!r}, trial={self.number}, of={self.original})"

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, a storage call; a driver's error or a deleted trial becomes one line.
        optguard's own ``StorageError`` (down past ``--storage-outage``) passes unchanged:
        the worker stops on it rather than failing the trial."""
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:
            cause = _storage_cause(exc, self.storage)
            if cause is None:
                raise
            raise CheckpointError(f"cannot {what} in the storage: {cause}") from exc

    # -- reading -----------------------------------------------------------------------------
    def _own(self) -> dict[int, Remote]:
        """The running trial's records by slot, read afresh (another manager may have saved)."""
        attrs = self._call(
            f"read the checkpoints of trial {self.number}",
            lambda: self.storage.get_trial_system_attrs(self.trial_id),
        )
        return {r.slot: r for r in _remotes(self.number, self.trial_id, attrs)}

    def _series(self) -> list[Remote]:
        """Every checkpoint record of the series."""
        if self._others is None:
            trials = self._call(
                f"read the checkpoints of trial {self.original}'s retries",
                lambda: self.storage.get_all_trials(self.study_id, deepcopy=False),
            )
            self._others = [
                remote
                for t in trials
                if t.number != self.number
                and original_number(t.number, t.user_attrs) == self.original
                for remote in _remotes(t.number, t._trial_id, t.system_attrs)
            ]
        return self._others + list(self._own().values())

    def _exists(self, remote: Remote) -> bool:
        from optuna.artifacts.exceptions import ArtifactNotFound

        if remote.artifact_id in self._present:
            return True
        if remote.artifact_id in self._gone:
            return False
        try:
            self.store.open_reader(remote.artifact_id).close()
        except ArtifactNotFound:
            self._gone.add(remote.artifact_id)  # rotated away; its record stays a while
            return False
        except OSError as exc:
            raise CheckpointError(
                f"cannot read the artifact store {self.where}: {exc.strerror or exc}"
            ) from None
        self._present.add(remote.artifact_id)
        return True

    def live(self) -> dict[int, list[Remote]]:
        """Checkpoints whose file is in the store, by step (ascending); the copies of a step
        newest first."""
        series = self._series()
        by_step: dict[int, list[Remote]] = {}
        for remote in series:
            if self._exists(remote):
                by_step.setdefault(remote.step, []).append(remote)
        if series and not by_step and not self._warned:
            self._warned = True  # a store each host has its own of: say why it starts over
            _log.warning(
                "Checkpoints of trial %d: the storage records %d upload(s) but the artifact "
                "store %s has none of their files; is it the store they went to (every host "
                "needs the same --artifacts directory)? Starting without them",
                self.original, len(series), self.where,
            )  # fmt: skip
        for copies in by_step.values():
            copies.sort(key=lambda r: r.order, reverse=True)
        return {step: by_step[step] for step in sorted(by_step)}

    def forget(self, remote: Remote) -> None:
        """Skip ``remote`` from now on (its file is unreadable); the store keeps it."""
        self._gone.add(remote.artifact_id)
        self._present.discard(remote.artifact_id)

    def open(self, remote: Remote) -> IO[bytes] | None:
        """A reader of ``remote``'s file, or None if it was removed meanwhile."""
        from optuna.artifacts.exceptions import ArtifactNotFound

        try:
            return self.store.open_reader(remote.artifact_id)
        except ArtifactNotFound:
            self.forget(remote)
            return None
        except OSError as exc:
            raise CheckpointError(
                f"cannot read checkpoint {artifact_name(remote.step, remote.suffix)} from the "
                f"artifact store {self.where}: {exc.strerror or exc}"
            ) from None

    # -- writing -----------------------------------------------------------------------------
    def _slot(self, own: dict[int, Remote], step: int, slots: int | None) -> int:
        """Where the record of a new upload of ``step`` goes: a free slot, else one whose file
        is gone, else the same step's, else the oldest. Unbounded ``keep`` (None): the step."""
        if slots is None:
            return step
        order = [(step + i) % slots for i in range(slots)]  # two steps at once: two slots
        for test in (
            lambda s: s not in own,
            lambda s: not self._exists(own[s]),
            lambda s: own[s].step == step,
        ):
            for slot in order:
                if test(slot):
                    return slot
        return min(order, key=lambda s: (own[s].step, own[s].order))

    def upload(
        self, src: IO[bytes], directory: Path, step: int, suffix: str, slots: int | None
    ) -> Remote:
        """Upload ``src``, the checkpoint of ``step`` just saved in ``directory``, and record
        it on the running trial in one of ``slots`` slots (None: one per step).

        The file goes first, durably (temp name in the store, fsync, rename, fsync of the
        directory), and its record second: a crash mid-upload leaves no record of a partial
        file. A failure leaves no unrecorded file behind.
        """
        from optuna.exceptions import UpdateFinishedTrialError

        artifact_id = new_artifact_id()
        name = artifact_name(step, suffix)
        try:
            atomic_write(Path(self.where), artifact_id, lambda fh: shutil.copyfileobj(src, fh))
        except OSError as exc:
            raise CheckpointError(
                f"saved step {step} in {directory} but cannot upload it to the artifact store "
                f"{self.where}: {exc.strerror or exc}"
            ) from None
        try:
            own = self._own()
            slot = self._slot(own, step, slots)
            self._call(
                f"record step {step} of trial {self.number}",
                lambda: record_artifact(
                    self.storage, self.trial_id, artifact_id, name, MIMETYPE,
                    key=record_key(self.trial_id, slot),
                ),  # fmt: skip
            )
        except UpdateFinishedTrialError:
            self._discard(artifact_id)
            raise CheckpointError(
                f"saved step {step} in {directory} but trial {self.number} has finished: "
                "its checkpoint cannot be recorded in the artifact store"
            ) from None
        except (CheckpointError, StorageError):
            self._discard(artifact_id)
            raise
        self._present.add(artifact_id)
        replaced = own.get(slot)
        if replaced is not None and replaced.artifact_id != artifact_id:
            self.remove([replaced])  # no record points at it any more
        return Remote(artifact_id, step, suffix, self.number, slot)

    def _discard(self, artifact_id: str) -> None:
        """Remove the file of a failed upload; a store that cannot even do that keeps an
        unrecorded file, which no reader ever looks at."""
        from optuna.artifacts.exceptions import ArtifactNotFound

        try:
            self.store.remove(artifact_id)
        except (ArtifactNotFound, OSError):
            pass  # nothing written, or an unwritable store: an orphan file at worst

    def remove(self, remotes: Iterable[Remote]) -> None:
        """Remove the files of ``remotes`` (rotation); their records stay until their slot is
        reused."""
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
            self.forget(remote)


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
