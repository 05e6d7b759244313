"""One worker process: claim a trial, run it under the guard, clean up, tell, repeat.

``optguard run`` starts N of these as ``optguard worker``; the same command can be started by
hand on another host or by a scheduler, since all coordination goes through the storage.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from optguard import guard as guard_mod
from optguard.cleanup import release_memory
from optguard.config import RunOptions
from optguard.errors import OptguardError
from optguard.guard import GuardPruned, TrialGuard, Violation
from optguard.limits import format_gb
from optguard.logs import set_trial, worker_log_path, worker_logger
from optguard.objective import error_line, load_objective
from optguard.storage import TrialSlots, mask_url, open_storage, resolve_url
from optguard.study import make_pruner, make_sampler

__all__ = ["run_worker", "WorkerIdentity", "ATTR_PREFIX", "START_FAILURE"]

ATTR_PREFIX = "optguard."
START_FAILURE = "Worker cannot start:"
REASON_INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class WorkerIdentity:
    index: int
    host: str
    pid: int

    @classmethod
    def current(cls, index: int) -> "WorkerIdentity":
        return cls(index=index, host=socket.gethostname(), pid=os.getpid())

    @property
    def tag(self) -> str:
        """``host:pid``, stored on every trial as ``optguard.worker``."""
        return f"{self.host}:{self.pid}"

    @property
    def label(self) -> str:
        return f"{self.index}:{self.pid}"


def _as_value(result: Any) -> tuple[float | None, str | None]:
    """The objective's result as a float, or why it cannot be one."""
    if isinstance(result, (str, bytes)) or result is None:
        return None, f"objective returned a non-number: {type(result).__name__} {result!r:.40}"
    try:
        value = float(result)
    except (TypeError, ValueError):
        return None, f"objective returned a non-number: {type(result).__name__}"
    if math.isnan(value):
        return None, "objective returned NaN"
    return value, None


class _StopFlag:
    """Set by SIGTERM/SIGINT: take no new trial, prune the running one at its next check.

    A second SIGINT raises ``KeyboardInterrupt`` as Python normally would, for a worker run
    by hand whose objective never reaches a check.
    """

    def __init__(self) -> None:
        self.reason: str | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = REASON_INTERRUPTED
        active = guard_mod.active_guard()
        if active is not None:
            active.request_stop(REASON_INTERRUPTED)


class _TrialRunner:
    def __init__(
        self,
        study: optuna.Study,
        objective: Callable[[optuna.trial.Trial], Any],
        opts: RunOptions,
        identity: WorkerIdentity,
        log: logging.Logger,
    ) -> None:
        self.study = study
        self.objective = objective
        self.opts = opts
        self.identity = identity
        self.log = log

    def _record_violation(self, trial: optuna.trial.Trial, violation: Violation) -> None:
        self.log.warning(violation.log_line())
        trial.set_user_attr(ATTR_PREFIX + "reason", violation.reason)
        trial.set_user_attr(ATTR_PREFIX + "elapsed_s", round(violation.elapsed_s, 3))
        trial.set_user_attr(ATTR_PREFIX + "rss_bytes", violation.rss_bytes)
        trial.set_user_attr(ATTR_PREFIX + "limit", violation.limit)
        if violation.reason == guard_mod.REASON_MEMORY:
            release_memory()  # give memory back before the pruned trial unwinds

    def run(self, trial: optuna.trial.Trial) -> TrialState:
        number = trial.number
        set_trial(number)
        trial.set_user_attr(ATTR_PREFIX + "worker", self.identity.tag)
        self.log.info("Trial #%d started", number)
        guard = TrialGuard(trial, self.opts.limits, lambda v: self._record_violation(trial, v))
        guard.install()
        value: float | None = None
        error: str | None = None
        state = TrialState.FAIL
        try:
            result = self.objective(trial)
        except GuardPruned:
            state = TrialState.PRUNED  # logged and recorded by _record_violation
        except optuna.TrialPruned as exc:
            state = TrialState.PRUNED
            self.log.info("Trial #%d pruned by the objective or pruner: %s", number, str(exc) or "-")
        except SystemExit as exc:
            error = f"objective called sys.exit({exc.code!r})"
        except KeyboardInterrupt:
            error = "interrupted by Ctrl+C"
        except Exception as exc:  # the objective's own bug: the trial fails, the worker goes on
            error = error_line(exc)
            for line in traceback.format_exc().rstrip().splitlines():
                self.log.info("traceback| %s", line)
        else:
            value, error = _as_value(result)
            if error is None:
                state = TrialState.COMPLETE
        finally:
            guard.uninstall()
        duration = guard.elapsed()
        if error is not None:
            self.log.error("Trial #%d failed: %s", number, error)
            trial.set_user_attr(ATTR_PREFIX + "error", error)
        self._finish(trial, state, value)
        self.log.info(
            "Trial #%d finished: state=%s value=%s duration=%.2fs",
            number,
            state.name,
            "-" if value is None else f"{value:.6g}",
            duration,
        )
        set_trial(None)
        return state

    def _finish(self, trial: optuna.trial.Trial, state: TrialState, value: float | None) -> None:
        """Clean up, record the final memory, then tell: a finished trial is read-only."""
        report = release_memory()
        trial.set_user_attr(ATTR_PREFIX + "final_rss_bytes", report.rss_after)
        self.log.info(
            "Trial #%d final memory: %s (freed %.1fMB in %.1fms, gc collected %d objects)",
            trial.number,
            format_gb(report.rss_after, 2),
            report.freed_bytes / 1e6,
            report.seconds * 1000,
            report.collected,
        )
        if state == TrialState.COMPLETE:
            self.study.tell(trial, value)
        else:
            self.study.tell(trial, state=state)


def _open_study(opts: RunOptions, url: str) -> tuple[optuna.Study, TrialSlots]:
    storage = open_storage(url)
    study = optuna.create_study(
        study_name=opts.study,
        storage=storage,
        direction=opts.direction,
        sampler=make_sampler(opts.sampler),
        pruner=make_pruner(opts.pruner),
        load_if_exists=True,
    )
    return study, TrialSlots(storage, opts.study)


def run_worker(opts: RunOptions, index: int = 0) -> int:
    """Run trials until the study has ``n_trials`` or a stop signal; return how many ran."""
    identity = WorkerIdentity.current(index)
    log = worker_logger(
        worker_log_path(opts.log_dir, opts.study, identity.host, index), identity.label
    )
    optuna_logger = logging.getLogger("optuna")
    optuna_logger.setLevel(logging.WARNING)
    optuna_logger.propagate = False
    for handler in log.handlers:
        optuna_logger.addHandler(handler)  # Optuna's own warnings land in the same file
    optuna.logging.disable_default_handler()
    stop = _StopFlag()
    stop.install()
    url = resolve_url(opts.storage)
    limits = opts.limits
    log.info(
        "Worker started: study=%s storage=%s host=%s timeout=%ss max_rss=%s",
        opts.study,
        mask_url(url),
        identity.host,
        limits.timeout_s,
        format_gb(limits.max_rss_bytes or 0),
    )
    try:
        objective = load_objective(opts.objective)
        study, slots = _open_study(opts, url)
    except OptguardError as exc:
        log.error("%s %s", START_FAILURE, exc)
        raise
    # Everything loaded so far (optuna, the objective's modules and data) lives as long as the
    # worker: freezing it keeps the post-trial gc passes from rescanning it after every trial.
    gc.freeze()
    runner = _TrialRunner(study, objective, opts, identity, log)
    ran = 0
    started = time.monotonic()
    try:
        while stop.reason is None:
            trial = slots.claim(study, opts.n_trials)
            if trial is None:
                log.info("Study %s has its %s trials", opts.study, opts.n_trials)
                break
            runner.run(trial)
            ran += 1
    finally:
        slots.close()
    log.info(
        "Worker exiting: %d trials in %.1fs%s",
        ran,
        time.monotonic() - started,
        f" (stopped: {stop.reason})" if stop.reason else "",
    )
    return ran
