"""Checks of ``optguard run``'s input made before anything touches the storage.

Bad input must leave the storage as it was: no study created, no attribute rewritten. So
everything that can be known without running the objective is checked here first: the
objective target, the sampler's packages, and every path the run will write to. Nothing is
created here: a directory is probed with a temporary file, removed at once.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from optguard.checkpointing import DEFAULT_ROOT as DEFAULT_CHECKPOINT_DIR
from optguard.config import RunOptions
from optguard.errors import UsageError
from optguard.objective import check_target
from optguard.study import missing_pruner_packages, missing_sampler_packages
from optguard.termination import TERMINATE_PACKAGES
from optguard.urls import journal_path, resolve_url, sqlite_path

__all__ = ["check_run_inputs", "check_sampler"]


def check_run_inputs(opts: RunOptions) -> None:
    """Raise ``UsageError`` (exit 2) naming the first problem found in ``opts``."""
    check_target(opts.objective)
    check_sampler(opts.sampler)
    _check_packages(missing_pruner_packages(opts.pruner), f"--pruner {opts.pruner}")
    if opts.terminate:
        _check_packages(
            [p for p in TERMINATE_PACKAGES if importlib.util.find_spec(p) is None], "--terminate"
        )
    _check_directory(opts.log_dir, "--log-dir", writable=True)
    # Only objectives calling optguard.checkpoints() write there: the default is not required
    # to be writable (a read-only working directory with a server storage is fine).
    explicit = opts.checkpoint_dir != DEFAULT_CHECKPOINT_DIR
    _check_directory(opts.checkpoint_dir, "--checkpoint-dir", writable=explicit)
    if opts.artifacts is not None and opts.artifacts.strip().lower() != "none":
        _check_directory(Path(opts.artifacts), "--artifacts", writable=True)
    _check_file_storage(opts.storage)


def check_sampler(sampler: str) -> None:
    """The sampler's optional packages are installed (they are not imported here)."""
    missing = missing_sampler_packages(sampler)
    if missing:
        noun = "package" if len(missing) == 1 else "packages"
        names = ", ".join(repr(m) for m in missing)
        raise UsageError(
            f"--sampler {sampler} needs the {noun} {names}: pip install {' '.join(missing)}"
        )


def _check_packages(missing: list[str], what: str) -> None:
    if missing:
        noun = "package" if len(missing) == 1 else "packages"
        names = ", ".join(repr(m) for m in missing)
        raise UsageError(f"{what} needs the {noun} {names}: pip install {' '.join(missing)}")


def _probe(directory: Path) -> OSError | None:
    """Why a file cannot be created in ``directory`` (which exists), or None.

    Trying is the only answer that holds for root, on read-only mounts and in /proc or /sys,
    where permission bits and ``os.access`` say yes.
    """
    try:
        fd, name = tempfile.mkstemp(prefix=".optguard-probe-", dir=directory)
    except OSError as exc:
        return exc
    os.close(fd)
    os.unlink(name)
    return None


def _check_directory(path: Path, option: str, *, writable: bool) -> None:
    """``path`` is a directory, or can be created, and (``writable``) files can be made in it."""
    shown = f"{option} {path}"
    for candidate in (path, *path.parents):  # the nearest part of it that exists
        real = candidate.absolute()
        if real.exists():
            break
        if real.is_symlink():
            raise UsageError(f"{shown}: {candidate} is a broken symbolic link")
    if not real.is_dir():
        what = "not a directory" if candidate == path else f"{candidate} is not a directory"
        raise UsageError(f"{shown}: {what}")
    if not writable:
        return
    problem = _probe(real)
    if problem is not None:
        reason = problem.strerror or str(problem)
        if candidate == path:
            raise UsageError(f"{shown}: cannot write in it ({reason})")
        raise UsageError(f"{shown}: cannot create it in {real} ({reason})")


def _check_file_storage(storage: str | None) -> None:
    """A SQLite or journal file can be created, or written with the files beside it (write
    lock, journal, Optuna's journal lock)."""
    url = resolve_url(storage)
    path = sqlite_path(url) or journal_path(url)
    if path is None:
        return
    kind = "SQLite" if sqlite_path(url) is not None else "journal"
    directory = path.parent
    if path.exists():
        if not path.is_file():
            raise UsageError(f"{kind} storage {path} is not a file")
        problem = _probe(directory) if directory.is_dir() else None
        if problem is None:
            try:
                with path.open("r+b"):  # opened for writing, nothing written
                    pass
            except OSError as exc:
                problem = exc
        if problem is not None:
            reason = problem.strerror or str(problem)
            raise UsageError(f"cannot write the {kind} storage {path} ({reason})")
        return
    if not directory.is_dir():
        raise UsageError(
            f"cannot create the {kind} storage {path}: directory {directory} does not exist"
        )
    problem = _probe(directory)
    if problem is not None:
        reason = problem.strerror or str(problem)
        raise UsageError(f"cannot create the {kind} storage {path} in {directory} ({reason})")
