"""Trial checkpoints: atomic saves, the latest one back, and emergency saves on interrupt.

``optguard.checkpoints(trial)`` is rooted at ``<root>/<study>/trial-<N>/`` where N is the
*original* trial number: a retry (``optguard.retry_of``) of an interrupted or guard-killed
trial gets the same directory and resumes from its last checkpoint instead of starting over.
With ``--checkpoint-store artifacts`` that directory is a cache of the artifact store
(``optguard.checkpoint_store``), which a retry on another host resumes from.

The module is named ``checkpointing`` so that importing it never shadows the
``optguard.checkpoints`` function on the package.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable

from optguard.artifacts import CHECKPOINT_STORE_ENV, CHECKPOINT_STORES
from optguard.errors import CheckpointError, StorageError, UsageError
from optguard.logs import safe_name

if TYPE_CHECKING:
    import optuna

    from optguard.checkpoint_store import ArtifactCheckpoints, Remote

__all__ = [
    "CheckpointManager",
    "PruneResult",
    "checkpoints",
    "checkpoint_root",
    "prune_checkpoints",
    "run_interrupt_callbacks",
    "has_interrupt_callbacks",
    "clear_interrupt_callbacks",
    "CHECKPOINT_DIR_ENV",
    "DEFAULT_ROOT",
    "METADATA",
]

CHECKPOINT_DIR_ENV = "OPTGUARD_CHECKPOINT_DIR"  # set by the worker from --checkpoint-dir
DEFAULT_ROOT = Path("checkpoints")
DEFAULT_KEEP = 5
METADATA = "checkpoint_metadata.json"
RETRY_OF_ATTR = "optguard.retry_of"
_FILE = re.compile(r"^step-(\d+)\.(pkl|pt)$")
_TRIAL_DIR = re.compile(r"^trial-(\d+)$")
_TMP_PREFIX = ".tmp-"
_TMP = re.compile(r"^\.tmp-(?P<host>.+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")
_SCAN_ITEMS = 100  # items of one container looked at when deciding on torch.save

_log = logging.getLogger("optguard.checkpoints")
_MISSING = object()  # no copy of a step left to read


class _Unreadable(CheckpointError):
    """A checkpoint file that exists but cannot be unpickled (truncated, corrupt)."""


_interrupt_callbacks: list[Callable[[], Any]] = []


def checkpoint_root(root: str | os.PathLike[str] | None = None) -> Path:
    """``root``, else the worker's ``--checkpoint-dir``, else ``checkpoints/`` in the cwd."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(CHECKPOINT_DIR_ENV) or DEFAULT_ROOT)


def study_dir(root: Path, study: str) -> Path:
    name = safe_name(study)
    return root / (name if name.strip(".") else "_" + name)  # never "." or ".."


def original_number(number: int, user_attrs: dict[str, Any]) -> int:
    """The trial whose checkpoints a trial uses: the one it retries, else itself."""
    retry_of = user_attrs.get(RETRY_OF_ATTR)
    return retry_of if isinstance(retry_of, int) and not isinstance(retry_of, bool) else number


def checkpoints(
    trial: "optuna.trial.Trial",
    keep: int | None = DEFAULT_KEEP,
    root: str | os.PathLike[str] | None = None,
    store: str | None = None,
    artifact_dir: str | os.PathLike[str] | None = None,
) -> "CheckpointManager":
    """The checkpoint manager of ``trial``: ``<root>/<study>/trial-<original number>/``.

    ``store`` (the worker's ``--checkpoint-store``, ``$OPTGUARD_CHECKPOINT_STORE``, when None):
    ``local``, or ``artifacts`` to upload every save to the artifact store at ``artifact_dir``
    (the worker's ``--artifacts`` when None) so that a retry on any host resumes."""
    study = getattr(getattr(trial, "study", None), "study_name", None)
    if not isinstance(study, str):
        raise UsageError("optguard.checkpoints() needs the optuna Trial of a study")
    store = store or os.environ.get(CHECKPOINT_STORE_ENV) or "local"
    if store not in CHECKPOINT_STORES:
        raise UsageError(
            f"checkpoint store must be one of {', '.join(CHECKPOINT_STORES)}, got {store!r}"
        )
    number = original_number(trial.number, trial.user_attrs)
    directory = study_dir(checkpoint_root(root), study) / f"trial-{number}"
    remote = None
    if store == "artifacts":
        from optguard.checkpoint_store import remote_of_trial

        remote = remote_of_trial(trial, number, artifact_dir)
    return CheckpointManager(directory, keep=keep, remote=remote)


def _torch_types() -> tuple[type, ...]:
    """Types saved with ``torch.save``; empty unless the objective already imported torch."""
    torch = sys.modules.get("torch")
    if torch is None:
        return ()
    types = [torch.Tensor]
    for module, name in (("nn", "Module"), ("optim", "Optimizer")):
        cls = getattr(getattr(torch, module, None), name, None)
        if isinstance(cls, type):
            types.append(cls)
    return tuple(types)


def _has(obj: Any, types: tuple[type, ...], depth: int = 3) -> bool:
    if isinstance(obj, types):
        return True
    if depth == 0:
        return False
    if isinstance(obj, dict):
        items: Iterable[Any] = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    else:
        return False
    return any(_has(item, types, depth - 1) for _, item in zip(range(_SCAN_ITEMS), items))


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def atomic_write(
    directory: Path, name: str, write: Callable[[IO[bytes]], None], read_back: bool = False
) -> IO[bytes] | None:
    """Write ``directory/name`` all or nothing; the temp file never stays. With ``read_back``,
    a reader of exactly the bytes written: another manager of the trial may put its own file
    under the name right after, and the upload of this save must not send that one."""
    prefix = f"{_TMP_PREFIX}{safe_name(socket.gethostname())}-{os.getpid()}-"
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
    back = None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if read_back:
            back = open(tmp, "rb")
        os.replace(tmp, directory / name)
        _fsync_dir(directory)
    except BaseException:  # disk full, a pickling error, GuardPruned raised mid-save: no debris
        if back is not None:
            back.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return back


def _iso(mtime: float) -> str:
    return datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="milliseconds")


class CheckpointManager:
    """Checkpoints of one trial in one directory: ``step-<step>.pkl`` (or ``.pt`` for torch).

    Every save is atomic (temp file in the same directory, fsync, rename, fsync of the
    directory), so a process killed mid-save leaves the previous checkpoint readable.

    With ``remote`` (``--checkpoint-store artifacts``) every save is also uploaded to the
    artifact store, and only the series' uploads count: the directory is then a cache whose
    file of a step is used only when the metadata names it a copy of that step's newest
    upload (a deleted and recreated study leaves files under the same name); anything else is
    downloaded anew when read.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        keep: int | None = DEFAULT_KEEP,
        remote: "ArtifactCheckpoints | None" = None,
    ) -> None:
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise UsageError(f"checkpoints: keep must be a whole number >= 1 or None, got {keep!r}")
        self.directory = Path(directory)
        self.keep = keep
        self.remote = remote
        self._lock = threading.Lock()  # the objective and an emergency callback may both save

    def __repr__(self) -> str:
        store = "" if self.remote is None else f", remote={self.remote!r}"
        return f"CheckpointManager({str(self.directory)!r}, keep={self.keep}{store})"

    # -- reading -----------------------------------------------------------------------------
    def _files(self) -> dict[int, Path]:
        """Complete checkpoints by step (a temp file is never one: renames are atomic)."""
        found: dict[int, tuple[float, Path]] = {}
        try:
            entries = list(os.scandir(self.directory))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except OSError as exc:
            raise CheckpointError(
                f"cannot list checkpoints in {self.directory}: {exc.strerror}"
            ) from None
        for entry in entries:
            match = _FILE.match(entry.name)
            if match is None:
                continue
            try:
                mtime = entry.stat().st_mtime
            except FileNotFoundError:
                continue  # rotated away meanwhile
            step = int(match.group(1))
            if step not in found or mtime > found[step][0]:
                found[step] = (mtime, Path(entry.path))
        return {step: found[step][1] for step in sorted(found)}

    def steps(self) -> list[int]:
        """Steps that have a checkpoint, oldest first: in the directory, or with the artifact
        store those its records list (the directory is only a cache of them then)."""
        if self.remote is None:
            return list(self._files())
        return list(self.remote.live())

    def _cached(self, step: int, remote: "Remote") -> Path | None:
        """The directory's file of ``step`` if it is the cached copy of ``remote``: a file
        another study, storage or upload left under the same name is never trusted."""
        path = self._files().get(step)
        if path is not None and self._cached_ids().get(path.name) == remote.artifact_id:
            return path
        return None

    def path(self, step: int) -> Path | None:
        """The file of ``step`` in the directory; with the artifact store, the cached copy of
        its newest upload, downloaded first if the directory lacks it."""
        if self.remote is None:
            return self._files().get(step)
        for remote in self.remote.live().get(step, []):
            path = self._cached(step, remote) or self._download(step, remote)
            if path is not None:
                return path
        return None

    def _download(self, step: int, remote: "Remote") -> Path | None:
        """Copy ``remote`` into the directory, atomically, and note its id in the metadata;
        None if the store no longer has it (removed since it was listed)."""
        assert self.remote is not None
        reader = self.remote.open(remote)
        if reader is None:
            return None
        name = f"step-{step:09d}.{remote.suffix}"
        with self._lock, reader:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                atomic_write(self.directory, name, lambda fh: shutil.copyfileobj(reader, fh))
                self._write_metadata({name: remote.artifact_id})
            except OSError as exc:
                raise CheckpointError(
                    f"cannot download checkpoint of step {step} into {self.directory}: "
                    f"{exc.strerror or exc}"
                ) from None
        return self.directory / name

    def _load_stored(self, step: int, copies: list["Remote"], map_location: Any) -> Any:
        """The object of the newest readable copy of ``step``: a cached copy that cannot be
        read is downloaded again, a downloaded one that cannot is skipped (logged) for the
        next copy. ``_MISSING`` when no copy is left; the last ``_Unreadable`` when none of
        them could be read."""
        assert self.remote is not None
        failed: _Unreadable | None = None
        for remote in copies:
            cached = self._cached(step, remote)
            for candidate in (cached, None) if cached is not None else (None,):
                path = candidate or self._download(step, remote)
                if path is None:
                    break  # removed from the store meanwhile
                try:
                    return self._read(path, map_location)
                except _Unreadable as exc:
                    failed = exc
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()  # never trusted again
                    if candidate is None:  # the store's file itself: skipped from now on
                        self.remote.forget(remote)
                        _log.warning("%s; trying an older copy or step", exc)
        if failed is not None:
            raise failed
        return _MISSING

    def load(self, step: int, map_location: Any = None) -> Any:
        """The object saved at ``step``; ``CheckpointError`` if there is none or it is
        unreadable (with the artifact store: every copy of it)."""
        if self.remote is None:
            path = self._files().get(step)
            found = _MISSING if path is None else self._read(path, map_location)
        else:
            found = self._load_stored(step, self.remote.live().get(step, []), map_location)
        if found is _MISSING:
            raise CheckpointError(f"no checkpoint of step {step} in {self.directory}")
        return found

    def latest(self, map_location: Any = None) -> tuple[int, Any] | None:
        """``(step, object)`` of the highest step saved, or None: where a trial resumes. With
        the artifact store a step none of whose copies can be read gives way to the next lower
        one, so that one bad upload does not block the resume."""
        if self.remote is None:
            files = self._files()
            if not files:
                return None
            step = max(files)
            return step, self._read(files[step], map_location)
        live = self.remote.live()
        for step in sorted(live, reverse=True):
            try:
                found = self._load_stored(step, live[step], map_location)
            except _Unreadable:
                continue  # logged per copy
            if found is not _MISSING:
                return step, found
        return None

    def _read(self, path: Path, map_location: Any) -> Any:
        try:
            with path.open("rb") as fh:
                if path.suffix == ".pt":
                    import torch  # a file torch.save wrote needs torch to be read

                    try:
                        # Our own file, written by this trial or the one it retries.
                        return torch.load(fh, map_location=map_location, weights_only=False)
                    except RuntimeError as exc:  # torch's "failed reading zip archive" & co.
                        raise _Unreadable(f"checkpoint {path} is unreadable: {exc}") from None
                return pickle.load(fh)
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from None
        except (EOFError, pickle.UnpicklingError) as exc:
            raise _Unreadable(f"checkpoint {path} is unreadable: {exc}") from None

    # -- writing -----------------------------------------------------------------------------
    def save(self, obj: Any, step: int) -> Path:
        """Save ``obj`` as the checkpoint of ``step`` atomically, then drop the oldest beyond
        ``keep`` and rewrite the metadata. Raises ``CheckpointError`` when the disk is full or
        the directory unwritable; the previous checkpoint is then intact."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise UsageError(f"checkpoint step must be a whole number >= 0, got {step!r}")
        torch_types = _torch_types()
        if torch_types and _has(obj, torch_types):
            torch = sys.modules["torch"]
            suffix, write = "pt", lambda fh: torch.save(obj, fh)
        else:
            suffix, write = "pkl", lambda fh: pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
        name = f"step-{step:09d}.{suffix}"
        with self._lock:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                written = atomic_write(self.directory, name, write, self.remote is not None)
            except OSError as exc:
                raise CheckpointError(
                    f"cannot save checkpoint of step {step} in {self.directory}: "
                    f"{exc.strerror or exc}"
                ) from None
            uploaded: Remote | None = None
            failed: CheckpointError | StorageError | None = None
            if self.remote is not None and written is not None:
                slots = None if self.keep is None else self.keep + 1  # +1: the one in flight
                try:
                    with written:
                        uploaded = self.remote.upload(written, self.directory, step, suffix, slots)
                except (CheckpointError, StorageError) as exc:  # raised once the local is tidy
                    failed = exc
            self._tidy(step, name, uploaded, failed)
        return self.directory / name

    def _tidy(
        self,
        step: int,
        name: str,
        uploaded: "Remote | None",
        failed: CheckpointError | StorageError | None,
    ) -> None:
        """After a save: the same step in the other format, the oldest beyond ``keep`` (here
        and, once uploaded, in the store, counting the series' uploads only, never files a
        foreign cache left here), older uploads of the step, temp files of dead processes;
        then the metadata. Raises ``failed`` (the upload's error), or the store's, at the end:
        the local side is tidy by then. Failures here lose no checkpoint."""
        files = self._files()
        live: dict[int, list[Remote]] | None = None  # None: rotate on the local files
        if self.remote is not None and uploaded is not None:
            try:
                live = self.remote.live()
            except (CheckpointError, StorageError) as exc:
                failed = exc
        kept = set(files) if live is None else set(live) | {step}
        if self.keep is not None:  # the step just saved, and the highest other steps
            others = sorted(kept - {step})
            kept = {step, *others[max(0, len(others) - (self.keep - 1)) :]}
        stale = [p for p in self.directory.glob(f"step-{step:09d}.*") if p.name != name]
        stale += [path for s, path in files.items() if s not in kept]
        stale += self._dead_temp_files()
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        try:
            self._write_metadata({name: None if uploaded is None else uploaded.artifact_id})
        except OSError as exc:
            raise CheckpointError(
                f"saved step {step} but cannot write {self.directory / METADATA}: "
                f"{exc.strerror or exc}"
            ) from None
        if failed is not None:
            raise failed
        if self.remote is not None and uploaded is not None and live is not None:
            self.remote.remove(self._superseded(step, kept, uploaded, live))

    @staticmethod
    def _superseded(
        step: int, kept: set[int], uploaded: "Remote", live: dict[int, list["Remote"]]
    ) -> list["Remote"]:
        """The uploads rotation removes: steps beyond ``keep``, and copies of ``step`` older
        than the one just uploaded. Another manager's newer copy of it stays, and ours goes;
        when that manager's record took our slot, only ours goes (no record points at it)."""
        gone = [r for s, copies in live.items() if s not in kept for r in copies]
        copies = live.get(step, [])
        if uploaded not in copies:
            return [*gone, uploaded]
        gone += [r for r in copies if r.order < uploaded.order]
        return gone if copies[0] == uploaded else [*gone, uploaded]

    def _dead_temp_files(self) -> list[Path]:
        """Temp files a process of this host left when it was killed mid-save."""
        host = safe_name(socket.gethostname())
        dead = []
        for path in self.directory.glob(_TMP_PREFIX + "*"):
            match = _TMP.match(path.name)
            if match is None or match["host"] != host or int(match["pid"]) == os.getpid():
                continue  # another host's (cannot tell if it runs) or ours
            try:
                os.kill(int(match["pid"]), 0)
            except ProcessLookupError:
                dead.append(path)
            except PermissionError:
                continue  # alive, someone else's process
        return dead

    def _cached_ids(self) -> dict[str, str | None]:
        """File name -> id of the upload it is a copy of, from the metadata (empty if it is
        missing or unparseable: nothing cached is trusted then)."""
        try:
            rows = json.loads((self.directory / METADATA).read_bytes())["checkpoints"]
            return {row["path"]: row.get("artifact_id") for row in rows}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return {}  # no metadata yet, or another version's: every copy is downloaded anew

    def metadata(self) -> list[dict[str, Any]]:
        """``step``, ``time`` (ISO 8601, UTC), ``size`` (bytes) and ``path`` (file name in the
        directory) of every checkpoint, oldest first, and with the artifact store the
        ``artifact_id`` the file is a copy of (None: not uploaded): what
        ``checkpoint_metadata.json`` holds."""
        return self._metadata({})

    def _metadata(self, ids: dict[str, str | None]) -> list[dict[str, Any]]:
        known = self._cached_ids() | ids if self.remote is not None else {}
        rows = []
        for step, path in self._files().items():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # rotated away meanwhile
            row = {"step": step, "time": _iso(st.st_mtime), "size": st.st_size, "path": path.name}
            if self.remote is not None:
                row["artifact_id"] = known.get(path.name)
            rows.append(row)
        return rows

    def _write_metadata(self, ids: dict[str, str | None]) -> None:
        """Rewrite the metadata, ``ids`` (file name -> upload id) updating what it held."""
        data = json.dumps({"checkpoints": self._metadata(ids)}, indent=2).encode()
        atomic_write(self.directory, METADATA, lambda fh: fh.write(data))

    # -- emergency ---------------------------------------------------------------------------
    def on_interrupt(self, callback: Callable[[], Any]) -> Callable[[], Any]:
        """Have optguard call ``callback()`` when it ends this trial early (guard prune,
        interrupt, cancel, Ctrl+C, SIGTERM), before the worker can be killed, within the
        worker's ``--checkpoint-budget``. Usable as a decorator; registering the same
        callback again (every epoch) keeps one."""
        if callback not in _interrupt_callbacks:
            _interrupt_callbacks.append(callback)
        return callback


def has_interrupt_callbacks() -> bool:
    return bool(_interrupt_callbacks)


def clear_interrupt_callbacks() -> None:
    """Forget the callbacks of the trial that ended (the worker calls it around each trial)."""
    _interrupt_callbacks.clear()


def _call(callback: Callable[[], Any], log: logging.Logger, name: str) -> None:
    from optguard.objective import error_line

    started = time.monotonic()
    try:
        callback()
    except Exception as exc:  # the callback's own bug: logged, the worker carries on
        log.error("Emergency checkpoint callback %s failed: %s", name, error_line(exc))
        return
    log.info("Emergency checkpoint callback %s done in %.2fs", name, time.monotonic() - started)


def run_interrupt_callbacks(budget_s: float, log: logging.Logger = _log) -> int:
    """Run the registered callbacks one after another, each in a daemon thread, all within
    ``budget_s``; a callback still running when it is spent is abandoned (and logged).

    Returns how many were abandoned. Called by the worker in its main thread, never from a
    signal handler.
    """
    callbacks = list(_interrupt_callbacks)
    _interrupt_callbacks.clear()
    deadline = time.monotonic() + budget_s
    abandoned = 0
    for callback in callbacks:
        name = getattr(callback, "__qualname__", repr(callback))
        left = deadline - time.monotonic()
        if left <= 0:
            log.warning(
                "Emergency checkpoint callback %s not run: the %gs budget is spent", name, budget_s
            )
            abandoned += 1
            continue
        thread = threading.Thread(
            target=_call, args=(callback, log, name), name="optguard-checkpoint", daemon=True
        )
        thread.start()
        thread.join(left)
        if thread.is_alive():
            log.warning(
                "Emergency checkpoint callback %s overran the %gs budget: abandoned", name, budget_s
            )
            abandoned += 1
    return abandoned


# -- pruning finished trials' checkpoints --------------------------------------------------------
@dataclass(frozen=True)
class PruneResult:
    """What ``prune_checkpoints`` removed and kept (trial numbers are directory numbers)."""

    directory: Path
    removed: list[int]
    freed_bytes: int
    kept_best: list[int]
    busy: list[int]  # directories of RUNNING or WAITING trials (retries queued): untouched


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def prune_checkpoints(
    study: str,
    storage_url: str | None = None,
    keep_best: int = 1,
    root: str | os.PathLike[str] | None = None,
) -> PruneResult:
    """Delete the checkpoint directories of finished trials except the best ``keep_best``
    COMPLETE ones (by the study's direction); never those a RUNNING or WAITING trial uses."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    from optguard.storage import open_existing_study

    if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 0:
        raise UsageError(f"--keep-best must be a whole number >= 0, got {keep_best!r}")
    _url, storage, study_id = open_existing_study(study, storage_url)
    directions = storage.get_study_directions(study_id)
    if len(directions) != 1:
        raise UsageError(f"study {study!r} has {len(directions)} objectives: --keep-best needs one")
    trials = storage.get_all_trials(study_id, deepcopy=False)

    def owner(trial: Any) -> int:
        return original_number(trial.number, trial.user_attrs)

    busy = {owner(t) for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)}
    finished = {owner(t) for t in trials if t.state.is_finished()}
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    complete.sort(
        key=lambda t: t.value, reverse=directions[0] == StudyDirection.MAXIMIZE
    )  # best first
    best: list[int] = []
    for trial in complete:
        if len(best) >= keep_best:
            break
        if owner(trial) not in best:
            best.append(owner(trial))

    base = study_dir(checkpoint_root(root), study)
    on_disk: dict[int, Path] = {}
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(base):
            match = _TRIAL_DIR.match(entry.name)
            if match is not None and entry.is_dir(follow_symlinks=False):
                on_disk[int(match.group(1))] = Path(entry.path)
    removed, freed = [], 0
    for number in sorted(on_disk):
        if number in busy or number in best or number not in finished:
            continue
        size = _tree_size(on_disk[number])
        try:
            shutil.rmtree(on_disk[number])
        except OSError as exc:
            raise CheckpointError(
                f"cannot remove {on_disk[number]}: {exc.strerror or exc}"
            ) from None
        removed.append(number)
        freed += size
    return PruneResult(
        directory=base,
        removed=removed,
        freed_bytes=freed,
        kept_best=[n for n in best if n in on_disk],
        busy=sorted(busy & set(on_disk)),
    )
