"""``optguard run``: prepare the storage, start N workers, watch them, replace the ones that die.

Modelled on gunicorn's arbiter: signal handlers only count signals; the loop does the
signalling, reaping, respawning and logging. Each worker runs in its own session, so the
terminal's Ctrl+C reaches only the supervisor, and a worker's whole process group can be
signalled without touching anything optguard did not start.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Callable

from optguard.config import RunOptions
from optguard.errors import (
    EXIT_STORAGE,
    EXIT_USAGE,
    OptguardError,
    StorageError,
    UsageError,
    WorkerCrashError,
)
from optguard.logs import worker_log_path, worker_logger
from optguard.progress import Progress, read_progress
from optguard.storage import mask_url, open_storage, resolve_url
from optguard.worker import ATTR_PREFIX, START_FAILURE

__all__ = ["run_study", "RunResult", "STORAGE_ENV"]

STORAGE_ENV = "OPTGUARD_STORAGE"  # workers get the URL here, not in argv where `ps` shows it
POLL_S = 0.1
PROGRESS_EVERY_S = 1.0
STOP_GRACE_S = 10.0
MAX_CRASHES = 5  # per CRASH_WINDOW_S, across all workers
CRASH_WINDOW_S = 60.0

_log = logging.getLogger("optguard.supervisor")


@dataclass(frozen=True)
class RunResult:
    progress: Progress
    n_trials: int | None
    seconds: float
    interrupted: bool
    workers_started: int
    worker_deaths: int


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    out: IO[bytes]

    @property
    def tag(self) -> str:
        return f"{socket.gethostname()}:{self.proc.pid}"


@dataclass
class _Signals:
    count: int = 0
    names: list[str] = field(default_factory=list)

    def handler(self, signum: int, _frame: FrameType | None) -> None:
        self.count += 1  # only a flag: the loop acts on it


def prepare_study(opts: RunOptions) -> tuple[str, "object", int]:
    """Create the schema and the study once, before any worker starts; returns the URL too."""
    import optuna
    import sqlalchemy.exc

    url = resolve_url(opts.storage)
    storage = open_storage(url, create_schema=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(
            study_name=opts.study, storage=storage, direction=opts.direction, load_if_exists=True
        )
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise StorageError(f"storage {mask_url(url)} refused the study: {type(exc).__name__}") from None
    if study.direction.name.lower() != opts.direction:
        raise UsageError(
            f"study {opts.study!r} exists with direction {study.direction.name.lower()}, "
            f"not {opts.direction}"
        )
    return url, storage, storage.get_study_id_from_name(opts.study)


def _worker_argv(opts: RunOptions, index: int) -> list[str]:
    argv = [
        sys.executable, "-m", "optguard", "worker",
        "--study", opts.study,
        "--objective", opts.objective,
        "--index", str(index),
        "--direction", opts.direction,
        "--sampler", opts.sampler,
        "--pruner", opts.pruner,
        "--log-dir", str(opts.log_dir),
    ]  # fmt: skip
    if opts.n_trials is not None:
        argv += ["--n-trials", str(opts.n_trials)]
    if opts.limits.timeout_s is not None:
        argv += ["--timeout", repr(opts.limits.timeout_s)]
    if opts.limits.max_rss_bytes is not None:
        argv += ["--max-rss", str(opts.limits.max_rss_bytes)]
    return argv


class _Supervisor:
    def __init__(
        self, opts: RunOptions, on_progress: Callable[[Progress], None] | None
    ) -> None:
        self.opts = opts
        self.on_progress = on_progress
        self.host = socket.gethostname()
        self.workers: dict[int, _Worker] = {}
        self.signals = _Signals()
        self.crashes: deque[float] = deque()
        self.started = 0
        self.deaths = 0
        self.stopping_since: float | None = None
        self.fatal: OptguardError | None = None

    # -- workers ---------------------------------------------------------------------------
    def spawn(self, index: int) -> None:
        opts = self.opts
        log_path = worker_log_path(opts.log_dir, opts.study, self.host, index)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = log_path.with_suffix(".out").open("ab")
        env = dict(os.environ, **{STORAGE_ENV: self.url})
        proc = subprocess.Popen(
            _worker_argv(opts, index),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.workers[index] = _Worker(index, proc, log_path, out)
        self.started += 1
        _log.info("started worker %d (pid %d)", index, proc.pid)

    def signal_all(self, signum: int) -> None:
        for worker in self.workers.values():
            try:
                os.killpg(worker.proc.pid, signum)
            except ProcessLookupError:
                pass  # the group is already gone; it is reaped in the loop

    def fail_running_trials(self, worker: _Worker, reason: str, detail: str) -> list[int]:
        """Mark the trials a dead worker left RUNNING as FAIL, with why, so none stays RUNNING."""
        from optuna.trial import TrialState

        failed = []
        for trial in self.storage.get_all_trials(
            self.study_id, deepcopy=False, states=(TrialState.RUNNING,)
        ):
            if trial.user_attrs.get(ATTR_PREFIX + "worker") != worker.tag:
                continue
            self.storage.set_trial_user_attr(trial._trial_id, ATTR_PREFIX + "reason", reason)
            self.storage.set_trial_user_attr(trial._trial_id, ATTR_PREFIX + "error", detail)
            self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            failed.append(trial.number)
        return failed

    def on_exit(self, worker: _Worker, code: int) -> None:
        del self.workers[worker.index]
        worker.out.close()
        if code == 0:
            return
        if code in (EXIT_USAGE, EXIT_STORAGE):
            self.fatal = self.fatal or _start_failure(worker.log_path, code)
            return
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        if code == -signal.SIGKILL:
            how += " (likely the kernel's OOM killer)"
        stopping = self.stopping_since is not None
        reason = "interrupted" if stopping else "worker_died"
        detail = f"worker {worker.tag} died: {how}"
        failed = self.fail_running_trials(worker, reason, detail)
        wlog = worker_logger(
            worker.log_path, f"{worker.index}:{worker.proc.pid}",
            name=f"optguard.supervisor.w{worker.index}",
            trial=",".join(map(str, failed)) or "-",
        )  # fmt: skip
        for number in failed:
            wlog.error("Trial #%d failed: %s (%s)", number, reason, detail)
        if stopping:
            return
        self.deaths += 1
        wlog.error("Worker died: %s; starting a replacement", how)
        now = time.monotonic()
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > CRASH_WINDOW_S:
            self.crashes.popleft()
        if len(self.crashes) > MAX_CRASHES:
            self.fatal = WorkerCrashError(
                f"{len(self.crashes)} worker deaths within {CRASH_WINDOW_S:.0f}s "
                f"(last: {how}); see {worker.log_path}"
            )
            return
        self.spawn(worker.index)

    # -- loop ------------------------------------------------------------------------------
    def run(self) -> RunResult:
        start = time.monotonic()
        self.url, self.storage, self.study_id = prepare_study(self.opts)
        previous = {s: signal.signal(s, self.signals.handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            progress = read_progress(self.storage, self.study_id)
            n = self.opts.n_trials
            if n is None or progress.finished < n:
                for index in range(self.opts.workers):
                    self.spawn(index)
            last_progress = 0.0
            while self.workers:
                if (self.signals.count or self.fatal) and self.stopping_since is None:
                    self.stopping_since = time.monotonic()
                    self.signal_all(signal.SIGTERM)
                elif (
                    self.stopping_since is not None
                    and time.monotonic() - self.stopping_since > STOP_GRACE_S
                ):
                    self.signal_all(signal.SIGKILL)
                for worker in list(self.workers.values()):
                    code = worker.proc.poll()
                    if code is not None:
                        self.on_exit(worker, code)
                if self.on_progress and time.monotonic() - last_progress > PROGRESS_EVERY_S:
                    last_progress = time.monotonic()
                    self.on_progress(read_progress(self.storage, self.study_id))
                time.sleep(POLL_S)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if self.fatal is not None:
            raise self.fatal
        progress = read_progress(self.storage, self.study_id)
        if self.on_progress:
            self.on_progress(progress)
        return RunResult(
            progress=progress,
            n_trials=self.opts.n_trials,
            seconds=time.monotonic() - start,
            interrupted=self.signals.count > 0,
            workers_started=self.started,
            worker_deaths=self.deaths,
        )


def _start_failure(log_path: Path, code: int) -> OptguardError:
    """The error a worker logged before exiting at start (bad objective, storage down)."""
    message = f"worker exited with code {code} at start; see {log_path}"
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        if START_FAILURE in line:
            message = line.split(START_FAILURE, 1)[1].strip()
            break
    return UsageError(message) if code == EXIT_USAGE else StorageError(message)


def run_study(
    opts: RunOptions, on_progress: Callable[[Progress], None] | None = None
) -> RunResult:
    """Run a guarded study to its ``n_trials`` with ``opts.workers`` worker processes."""
    return _Supervisor(opts, on_progress).run()
