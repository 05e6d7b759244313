"""``optguard run``: prepare the storage, start N workers, enforce limits from outside.

Modelled on gunicorn's arbiter: signal handlers only count signals; the loop does the
sampling, signalling, reaping, respawning and logging. Each worker leads its own session, so
the terminal's Ctrl+C reaches only the supervisor and a worker's process group can be
signalled without touching anything optguard did not start. The supervisor is a child
subreaper: a daemon a trial double-forks away is re-parented here, found, and ended.

Escalation for a trial that never reaches a check (each step logged in the worker's log):
soft (the worker's next check prunes) -> interrupt (``GuardPruned`` raised in the worker's
main thread) -> kill (SIGTERM then SIGKILL to the worker's process group, the trial marked
PRUNED here, a replacement worker started).

Emergency checkpoints: a worker about to run its trial's ``on_interrupt`` callbacks reports
``checkpointing`` with its budget; until that budget (plus ``CHECKPOINT_MARGIN_S``) is spent,
no step that would end the worker (interrupt -> kill, SIGTERM -> SIGKILL, a fatal stop's
SIGKILL) is taken, except a kill for memory above the ceiling. A worker stuck in C never
reports, so its kill timing is unchanged.
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import IO, Any, Callable

import psutil

from optguard import channel, proctree
from optguard.config import RunOptions
from optguard.errors import (
    EXIT_STORAGE,
    EXIT_USAGE,
    OptguardError,
    StorageError,
    UsageError,
    WorkerCrashError,
)
from optguard.control import read_request, set_request
from optguard.early_stopping import study_plateaued
from optguard.guard import REASON_MEMORY, REASON_SYSTEM_MEMORY, REASON_TIMEOUT, Violation
from optguard.logs import worker_log_path, worker_logger
from optguard.preflight import check_run_inputs
from optguard.progress import Progress, read_progress
from optguard.recovery import Recovery, reap_stale, recover
from optguard.report import LIMITS_ATTR
from optguard.storage import TrialSlots, mask_url, open_storage, resolve_url
from optguard.worker import ATTR_PREFIX, EXIT_RECYCLE, START_FAILURE

__all__ = ["run_study", "RunResult", "STORAGE_ENV"]

STORAGE_ENV = "OPTGUARD_STORAGE"  # workers get the URL here, not in argv where `ps` shows it
POLL_S = 0.1  # memory sampling rate of each worker's tree: 10 Hz
PIDS_EVERY_S = 1.0  # how often each worker's descendants are listed again
REQUESTS_EVERY_S = 1.0  # stop/cancel requests in the storage
PROGRESS_EVERY_S = 2.0  # the progress display: a few aggregate queries
INTERRUPT_ACK_S = 0.5  # an interrupt not acknowledged by then: the worker is stuck in C
STOP_GRACE_S = 10.0  # cancel: from "prune at the next check" to the interrupt
CHECKPOINT_MARGIN_S = 1.0  # past a worker's checkpoint budget: time to tell the trial
REASON_CANCELLED = "cancelled"
EARLY_STOP_ATTR = "optguard.early_stopped"  # on the study: why --patience ended it
ORPHAN_GRACE_S = 2.0
PSS_FROM = 0.9  # confirm with PSS once summed RSS passes this fraction of the limit
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
    interrupts: int
    hard_kills: int


@dataclass
class _Trial:
    """The trial a worker runs, as the supervisor watches it."""

    number: int
    trial_id: int
    started: float  # the worker's time.monotonic() at the start: one clock per host
    peak: int = 0
    peak_sent: int = 0
    violation: Violation | None = None
    violation_at: float = 0.0
    interrupted_at: float | None = None
    acked: bool = False  # the worker said it acted on the interrupt


@dataclass
class _Worker:
    index: int
    uid: str  # index.spawn: inherited by descendants as OPTGUARD_WORKER
    proc: subprocess.Popen[bytes]
    log: logging.Logger
    log_path: Path
    out: IO[bytes]
    status: channel.LineReader
    control_fd: int
    ready: bool = False
    trial: _Trial | None = None
    pids: list[int] = field(default_factory=list)
    memory: int = 0
    kill: Violation | None = None
    kill_at: float = 0.0
    kill_escalated: bool = False
    kill_now: bool = False  # memory above the ceiling: no wait for emergency checkpoints
    checkpoint_until: float = 0.0  # running emergency checkpoint callbacks until then

    @property
    def tag(self) -> str:
        return f"{socket.gethostname()}:{self.proc.pid}"

    def command(self, cmd: str, violation: Violation, signum: int) -> None:
        channel.send(
            self.control_fd,
            {
                "cmd": cmd,
                "trial": violation.trial_number,
                "reason": violation.reason,
                "elapsed_s": violation.elapsed_s,
                "rss_bytes": violation.rss_bytes,
                "limit": violation.limit,
            },
        )
        try:
            os.kill(self.proc.pid, signum)
        except ProcessLookupError:
            pass  # it just exited; the loop reaps it

    def signal_tree(self, signum: int) -> None:
        """The worker's process group, and descendants that left it (setsid) as last listed."""
        proctree.kill_group(self.proc.pid, signum)
        for pid in self.pids:
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass  # already gone

    def close(self) -> None:
        self.out.close()
        os.close(self.control_fd)
        os.close(self.status.fd)


@dataclass
class _Orphan:
    """A process re-parented to the supervisor: which worker and trial it came from."""

    proc: psutil.Process
    worker: str | None
    trial: str | None
    termed_at: float | None = None


def _signal_proc(proc: psutil.Process, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except psutil.Error:
        pass  # exited meanwhile


@dataclass
class _Signals:
    count: int = 0
    last: int = 0

    def handler(self, signum: int, _frame: FrameType | None) -> None:
        self.count += 1  # only flags: the loop acts on them
        self.last = signum


def prepare_study(opts: RunOptions) -> tuple[str, Any, Any, int, Recovery]:
    """Create the schema and the study once, then recover it, before any worker starts."""
    import optuna
    import sqlalchemy.exc

    url = resolve_url(opts.storage)
    storage = open_storage(url, create_schema=True, heartbeat_s=opts.heartbeat_s)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(
            study_name=opts.study, storage=storage, direction=opts.direction, load_if_exists=True
        )
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise StorageError(
            f"storage {mask_url(url)} refused the study: {type(exc).__name__}"
        ) from None
    if study.direction.name.lower() != opts.direction:
        raise UsageError(
            f"study {opts.study!r} exists with direction {study.direction.name.lower()}, "
            f"not {opts.direction}"
        )
    slots = TrialSlots(storage, opts.study)
    storage.set_study_user_attr(
        slots.study_id,
        LIMITS_ATTR,
        {"timeout_s": opts.limits.timeout_s, "max_rss_bytes": opts.limits.max_rss_bytes},
    )  # `optguard report` compares trials with these, from any host
    try:
        with slots.lock():
            recovery = recover(study, storage, slots.study_id, opts.retry_pruned)
    finally:
        slots.close()
    return url, storage, study, slots.study_id, recovery


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
        "--checkpoint-dir", str(opts.checkpoint_dir),
        "--checkpoint-budget", repr(opts.checkpoint_budget_s),
    ]  # fmt: skip
    optional = {
        "--n-trials": opts.n_trials,
        "--timeout": opts.limits.timeout_s,
        "--max-rss": opts.limits.max_rss_bytes,
        "--max-trials-per-worker": opts.max_trials_per_worker,
        "--recycle-rss": opts.recycle_rss,
    }
    if opts.tag is not None:
        argv += ["--tag", opts.tag]
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, repr(value)]
    return argv


def _describe_exit(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    how = f"signal {signal.Signals(-code).name}"
    return how + (" (likely the kernel's OOM killer)" if code == -signal.SIGKILL else "")


class _Supervisor:
    def __init__(
        self,
        opts: RunOptions,
        on_progress: Callable[[Progress], None] | None,
        on_recovery: Callable[[Recovery], None] | None = None,
        on_notice: Callable[[str], None] | None = None,
    ) -> None:
        self.opts = opts
        self.on_recovery = on_recovery
        self.on_notice = on_notice
        self.esc = opts.escalation
        self.on_progress = on_progress
        self.host = socket.gethostname()
        self.workers: dict[int, _Worker] = {}
        self.signals = _Signals()
        self.crashes: deque[float] = deque()
        self.spawned = 0
        self.deaths = 0
        self.interrupts = 0
        self.hard_kills = 0
        self.stopping_since: float | None = None  # fatal error: end every worker now
        self.draining = False  # stop or cancel: no new trial, no replacement worker
        self.cancel_at: float | None = None
        self.signals_seen = 0
        self.requests_at = 0.0
        self.heartbeat_at = 0.0
        self.fatal: OptguardError | None = None
        self.orphans: dict[int, _Orphan] = {}
        self.by_uid: dict[str, _Worker] = {}  # every worker this run started, exited ones too
        self.pids_at = 0.0  # when the process trees were last listed

    # -- workers ---------------------------------------------------------------------------
    def spawn(self, index: int) -> None:
        opts = self.opts
        log_path = worker_log_path(opts.log_dir, opts.study, self.host, index)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = log_path.with_suffix(".out").open("ab")
        status_r, status_w, control_r, control_w = channel.open_pipe_pair()
        self.spawned += 1
        uid = f"{index}.{self.spawned}"
        env = dict(os.environ)
        env.update({
            STORAGE_ENV: self.url,
            channel.STATUS_FD_ENV: str(status_w),
            channel.CONTROL_FD_ENV: str(control_r),
            channel.WORKER_ENV: uid,
            channel.SUPERVISOR_ENV: str(os.getpid()),
        })  # fmt: skip
        proc = subprocess.Popen(
            _worker_argv(opts, index),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            pass_fds=(status_w, control_r),
        )
        os.close(status_w)
        os.close(control_r)
        wlog = worker_logger(
            log_path, f"{index}:{proc.pid}", name=f"optguard.supervisor.w{index}", trial="-"
        )
        worker = _Worker(
            index, uid, proc, wlog, log_path, out, channel.LineReader(status_r), control_w
        )
        self.workers[index] = self.by_uid[uid] = worker
        _log.info("started worker %d (pid %d)", index, proc.pid)

    def _log(self, worker: _Worker, level: int, number: int | None, msg: str) -> None:
        worker.log.log(level, msg, extra={"trial": "-" if number is None else number})

    def read_status(self, worker: _Worker) -> None:
        for event in worker.status.read():
            kind = event.get("event")
            if kind == "ready":
                worker.ready = True
            elif kind == "start":
                worker.trial = _Trial(event["trial"], event["trial_id"], event["started"])
                worker.checkpoint_until = 0.0  # the last trial's hold is not this one's
            elif kind == "interrupted" and worker.trial and worker.trial.number == event.get("trial"):
                worker.trial.acked = True
            elif kind == "checkpointing":
                budget = float(event.get("budget_s", 0.0))
                worker.checkpoint_until = time.monotonic() + budget + CHECKPOINT_MARGIN_S
            elif kind == "end" and worker.trial and worker.trial.number == event.get("trial"):
                worker.trial = None

    # -- the watch: time and memory of each running trial ----------------------------------
    def list_trees(self, now: float) -> None:
        """Every worker's process tree, and the orphans re-parented here, from one listing of
        ``/proc`` per ``PIDS_EVERY_S``: the supervisor's main cost when trials are short."""
        if now - self.pids_at < PIDS_EVERY_S:
            return
        self.pids_at = now
        kids = proctree.children_map()
        for worker in self.workers.values():
            worker.pids = proctree.tree_pids(worker.proc.pid, kids) or [worker.proc.pid]
        self.sweep_orphans(now, kids.get(os.getpid(), []))

    def measure(self, worker: _Worker) -> int:
        memory = proctree.rss_of(worker.pids or [worker.proc.pid])
        limit = self.opts.limits.max_rss_bytes
        if limit is not None and len(worker.pids) > 1 and memory > limit * PSS_FROM:
            memory = proctree.pss_of(worker.pids)  # shared pages counted once, not per process
        worker.memory = memory
        return memory

    def watch(self, worker: _Worker, now: float) -> None:
        trial = worker.trial
        if trial is None or worker.kill is not None:
            return
        memory = self.measure(worker)
        if self.cancel_at is not None:
            self.watch_cancel(worker, trial, now)
            return
        if memory > trial.peak:
            trial.peak = memory
            if memory > trial.peak_sent * 1.02:
                trial.peak_sent = memory
                channel.send(
                    worker.control_fd, {"cmd": "peak", "trial": trial.number, "bytes": memory}
                )
        elapsed = time.monotonic() - trial.started
        limits, esc = self.opts.limits, self.esc
        limit = limits.max_rss_bytes
        if limit is not None and memory > limit:
            violation = Violation(trial.number, REASON_MEMORY, elapsed, memory, float(limit))
            if memory > limit * esc.memory_ceiling:
                self._log(
                    worker, logging.WARNING, trial.number,
                    f"Trial #{trial.number}: memory {memory / 1e6:.0f}MB is above the ceiling "
                    f"{esc.memory_ceiling:g}x the limit {limit / 1e6:.0f}MB: killing at once",
                )  # fmt: skip
                self.begin_kill(worker, violation, now=True)
                return
            if trial.violation is None and esc.memory_grace_s <= 0:
                trial.violation_at = now
                self.interrupt(worker, trial, violation, "no memory grace: interrupting the worker")
            elif trial.violation is None:
                trial.violation, trial.violation_at = violation, now
                self.step(worker, "soft", violation, "pruning at its next check")
            elif trial.interrupted_at is None and now - trial.violation_at > esc.memory_grace_s:
                self.interrupt(worker, trial, violation)
        if (
            limits.timeout_s is not None
            and trial.interrupted_at is None
            and elapsed > limits.timeout_s + esc.grace_s
        ):
            violation = Violation(trial.number, REASON_TIMEOUT, elapsed, memory, limits.timeout_s)
            self.interrupt(worker, trial, violation)
        if trial.violation is not None and self.interrupt_spent(worker, trial, now):
            self.begin_kill(worker, replace(trial.violation, elapsed_s=elapsed))

    def watch_cancel(self, worker: _Worker, trial: _Trial, now: float) -> None:
        """A cancelled trial: pruned at its next check, interrupted, then killed."""
        if trial.violation is None or trial.violation.reason != REASON_CANCELLED:
            elapsed = time.monotonic() - trial.started
            trial.violation = Violation(trial.number, REASON_CANCELLED, elapsed, worker.memory, 0.0)
            trial.violation_at, trial.interrupted_at = now, None
            self.step(worker, "soft", trial.violation, "cancel: pruning at its next check")
        elif trial.interrupted_at is None and now - trial.violation_at > STOP_GRACE_S:
            self.interrupt(worker, trial, trial.violation)
        elif self.interrupt_spent(worker, trial, now):
            self.begin_kill(worker, trial.violation)

    def heartbeat(self) -> None:
        """Beat for this host's running trials (a worker stuck in C cannot beat for itself),
        then reap trials of other hosts whose beats stopped, and retry them once."""
        for worker in self.workers.values():
            if worker.trial is not None:
                self.storage.record_heartbeat(worker.trial.trial_id)
        stale = reap_stale(self.study, self.storage, self.study_id)
        if stale.reaped and self.on_notice is not None:
            self.on_notice(
                f"no heartbeat from trial(s) {', '.join(f'#{n}' for n in stale.reaped)}: marked "
                f"FAIL (interrupted); retrying {', '.join(f'#{n}' for n in stale.retried) or 'none'}"
            )

    # -- stop and cancel: Ctrl+C, SIGTERM, or a request in the study's storage ------------------
    def handle_requests(self, now: float) -> None:
        if self.signals.count > self.signals_seen:
            self.signals_seen = self.signals.count
            if self.signals.count == 1 and self.signals.last == signal.SIGINT:
                self.stop("Ctrl+C: no new trials, running trials finish; Ctrl+C again cancels them")
            else:
                self.cancel("cancelling: running trials are pruned at their next check")
        if now - self.requests_at > REQUESTS_EVERY_S:
            self.requests_at = now
            if self.opts.patience is not None and not self.draining:
                self.check_plateau()
            action = read_request(self.storage, self.study_id)
            if action == "stop" and not self.draining:
                self.stop("optguard stop: no new trials, running trials finish")
            elif action == "cancel" and self.cancel_at is None:
                self.cancel("optguard cancel: running trials are pruned at their next check")

    def check_plateau(self) -> None:
        """``--patience``: end the study on every host once the best value stops improving."""
        from optuna.trial import TrialState

        finished = self.storage.get_all_trials(
            self.study_id, deepcopy=False,
            states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL),
        )  # fmt: skip
        reason = study_plateaued(
            finished, self.opts.patience or 0, self.opts.min_delta,
            self.opts.direction == "maximize",
        )  # fmt: skip
        if reason is not None:
            self.storage.set_study_user_attr(self.study_id, EARLY_STOP_ATTR, reason)
            set_request(self.storage, self.study_id, "stop")
            self.stop(reason)

    def stop(self, notice: str) -> None:
        self.draining = True
        for worker in self.workers.values():
            try:
                os.kill(worker.proc.pid, signal.SIGUSR2)
            except ProcessLookupError:
                pass  # exited; the loop reaps it
        if self.on_notice is not None:
            self.on_notice(notice)

    def cancel(self, notice: str) -> None:
        self.stop(notice)
        self.cancel_at = time.monotonic()

    def interrupt(
        self,
        worker: _Worker,
        trial: _Trial,
        violation: Violation,
        note: str = "no check within the grace period: interrupting the worker",
    ) -> None:
        trial.violation = violation
        trial.interrupted_at = time.monotonic()
        self.interrupts += 1
        self.step(worker, "interrupt", violation, note)

    def step(self, worker: _Worker, cmd: str, violation: Violation, note: str) -> None:
        """Log one escalation step in the worker's log and send it the command."""
        number = violation.trial_number
        self._log(
            worker, logging.WARNING, number,
            f"Trial #{number}: {violation.phrase} ({violation.detail}); {note} [{cmd}]",
        )  # fmt: skip
        worker.command(cmd, violation, signal.SIGUSR1)

    def watch_system_memory(self) -> None:
        """Prune the biggest running trial when the machine's used RAM crosses the threshold."""
        vm = psutil.virtual_memory()
        if vm.percent <= self.esc.max_system_ram_pct:
            return
        busy = [w for w in self.workers.values() if w.trial is not None and w.kill is None]
        if not busy or any(w.trial and w.trial.interrupted_at for w in busy):
            return  # one at a time: wait for the trial already being pruned
        worker = max(busy, key=lambda w: w.memory)
        trial = worker.trial
        if trial is None:
            return
        threshold = vm.total * self.esc.max_system_ram_pct / 100
        violation = Violation(
            trial.number, REASON_SYSTEM_MEMORY, time.monotonic() - trial.started,
            worker.memory, threshold,
        )  # fmt: skip
        self._log(
            worker, logging.WARNING, trial.number,
            f"System RAM at {vm.percent:.1f}% > {self.esc.max_system_ram_pct:g}%: trial "
            f"#{trial.number} uses the most ({worker.memory / 1e6:.0f}MB)",
        )  # fmt: skip
        self.interrupt(worker, trial, violation)

    # -- killing -----------------------------------------------------------------------------
    def interrupt_spent(self, worker: _Worker, trial: _Trial, now: float) -> bool:
        """Whether an interrupted trial's worker is due for the kill step.

        A worker running Python handles the interrupt within milliseconds and says so; one that
        has not after ``INTERRUPT_ACK_S`` is stuck in C and cannot act on a SIGTERM either, so
        waiting ``--kill-after`` twice would only delay the SIGKILL. One that acknowledged gets
        ``--kill-after`` to end the trial, counted from the end of its checkpoint budget when it
        asked for one (after its callbacks it still records, cleans up and tells the trial).
        """
        if trial.interrupted_at is None or self.checkpointing(worker, now):
            return False
        if not trial.acked:
            return now - trial.interrupted_at > min(INTERRUPT_ACK_S, self.esc.kill_after_s)
        return now - max(trial.interrupted_at, worker.checkpoint_until) > self.esc.kill_after_s

    @staticmethod
    def checkpointing(worker: _Worker, now: float) -> bool:
        """The worker runs emergency checkpoint callbacks: nothing may end it yet."""
        return now < worker.checkpoint_until

    def begin_kill(self, worker: _Worker, violation: Violation, now: bool = False) -> None:
        worker.kill = violation
        worker.kill_at = time.monotonic()
        worker.kill_now = now
        self._log(
            worker, logging.ERROR, violation.trial_number,
            f"Trial #{violation.trial_number}: killing worker pid {worker.proc.pid} and its "
            f"process tree (SIGTERM, SIGKILL after {self.esc.kill_after_s:g}s) [hard_kill]",
        )  # fmt: skip
        worker.command("kill", violation, signal.SIGTERM)
        worker.signal_tree(signal.SIGTERM)

    def escalate_kills(self, now: float) -> None:
        for worker in self.workers.values():
            if worker.kill is not None and not worker.kill_escalated:
                if now - worker.kill_at > self.esc.kill_after_s and (
                    worker.kill_now or not self.checkpointing(worker, now)
                ):
                    worker.kill_escalated = True
                    worker.signal_tree(signal.SIGKILL)

    def sweep_orphans(self, now: float, children: list[int]) -> None:
        """End processes re-parented here once the trial that started them is over.

        An orphan names its worker (and, when it was exec'd, its trial) in its inherited
        environment; a forked one is pinned to the trial its worker ran when first seen. Zombies
        are reaped.
        """
        by_uid = self.by_uid
        worker_pids = {w.proc.pid for w in self.workers.values()}
        for gone in set(self.orphans) - set(children):
            del self.orphans[gone]  # reaped: no longer a child of this process
        for pid in children:
            if pid in worker_pids:
                continue
            try:
                child = self.orphans[pid].proc if pid in self.orphans else psutil.Process(pid)
                if child.status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(child.pid, os.WNOHANG)
                    self.orphans.pop(child.pid, None)
                    continue
            except (psutil.Error, ChildProcessError):
                continue  # gone already
            orphan = self.orphans.get(child.pid)
            if orphan is None:
                uid, trial = proctree.environ_of(child.pid, channel.WORKER_ENV, channel.TRIAL_ENV)
                owner = by_uid.get(uid or "")
                if trial is None and owner is not None and owner.trial is not None:
                    trial = str(owner.trial.number)
                orphan = self.orphans[child.pid] = _Orphan(child, uid, trial)
            if orphan.termed_at is not None:
                if now - orphan.termed_at > ORPHAN_GRACE_S:
                    _signal_proc(child, signal.SIGKILL)
                continue
            owner = by_uid.get(orphan.worker or "")
            running = None if owner is None or owner.trial is None else str(owner.trial.number)
            if running is not None and running == orphan.trial:
                continue  # the trial that started it is still running
            _signal_proc(child, signal.SIGTERM)
            orphan.termed_at = now
            if owner is not None:
                self._log(
                    owner, logging.WARNING, None,
                    f"Ended pid {child.pid} left running by trial #{orphan.trial} "
                    f"(re-parented to the supervisor)",
                )  # fmt: skip

    # -- exits -------------------------------------------------------------------------------
    def mark_trial(self, worker: _Worker, state: Any, attrs: dict[str, Any]) -> list[int]:
        """Finish the trials a dead worker left RUNNING, so none stays RUNNING."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        marked = []
        for trial in self.storage.get_all_trials(
            self.study_id, deepcopy=False, states=(TrialState.RUNNING,)
        ):
            if trial.user_attrs.get(ATTR_PREFIX + "worker") != worker.tag:
                continue
            try:
                for key, value in attrs.items():
                    self.storage.set_trial_user_attr(trial._trial_id, ATTR_PREFIX + key, value)
                self.storage.set_trial_state_values(trial._trial_id, state)
            except UpdateFinishedTrialError:
                continue  # the worker told it just before it died
            marked.append(trial.number)
        return marked

    def on_exit(self, worker: _Worker, code: int) -> None:
        from optuna.trial import TrialState

        del self.workers[worker.index]
        self.read_status(worker)
        worker.close()
        trial, worker.trial = worker.trial, None  # whatever it ran is over: its orphans can go
        self.pids_at = 0.0  # look for them now
        if worker.kill is not None:
            self.record_kill(worker, trial, code)
        elif code == EXIT_RECYCLE:
            self._log(worker, logging.INFO, None, "Worker recycled: starting a fresh one")
        elif code in (EXIT_USAGE, EXIT_STORAGE) and not worker.ready:
            self.fatal = self.fatal or _start_failure(worker.log_path, code)
            return
        elif code != 0:
            how = _describe_exit(code)
            stopping = self.draining or self.stopping_since is not None
            reason = "interrupted" if stopping else "worker_died"
            detail = f"worker {worker.tag} died: {how}"
            for number in self.mark_trial(
                worker, TrialState.FAIL, {"reason": reason, "error": detail}
            ):
                self._log(worker, logging.ERROR, number, f"Trial #{number} failed: {reason} ({detail})")
            if not stopping:
                self.deaths += 1
                self._log(worker, logging.ERROR, None, f"Worker died: {how}; starting a replacement")
                if self.too_many_crashes(how, worker):
                    return
        else:
            return  # done: the study has its trials or the worker was stopped
        if self.stopping_since is None and not self.draining:
            self.spawn(worker.index)

    def record_kill(self, worker: _Worker, trial: _Trial | None, code: int) -> None:
        from optuna.trial import TrialState

        violation = worker.kill
        if violation is None:
            return
        attrs = {
            "reason": violation.reason,
            "elapsed_s": round(violation.elapsed_s, 3),
            "rss_bytes": violation.rss_bytes,
            "limit": violation.limit,
            "enforcement": "hard_kill",
            "hard_kill": True,
            "peak_rss_bytes": trial.peak if trial else violation.rss_bytes,
        }
        marked = self.mark_trial(worker, TrialState.PRUNED, attrs)
        self.hard_kills += 1
        line = replace(violation, enforcement="hard_kill").log_line()
        self._log(
            worker, logging.ERROR, violation.trial_number,
            f"{line} [hard_kill: worker {_describe_exit(code)}; "
            f"trial {'marked PRUNED' if marked else 'already finished'}]",
        )  # fmt: skip

    def too_many_crashes(self, how: str, worker: _Worker) -> bool:
        now = time.monotonic()
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > CRASH_WINDOW_S:
            self.crashes.popleft()
        if len(self.crashes) > MAX_CRASHES:
            self.fatal = WorkerCrashError(
                f"{len(self.crashes)} worker deaths within {CRASH_WINDOW_S:.0f}s "
                f"(last: {how}); see {worker.log_path}"
            )
            return True
        return False

    # -- loop --------------------------------------------------------------------------------
    def run(self) -> RunResult:
        start = time.monotonic()
        check_run_inputs(self.opts)  # before the storage is touched: bad input changes nothing
        self.url, self.storage, self.study, self.study_id, recovery = prepare_study(self.opts)
        if self.on_recovery is not None:
            self.on_recovery(recovery)
        proctree.become_subreaper()
        previous = {s: signal.signal(s, self.signals.handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            n = self.opts.n_trials
            if n is None or read_progress(self.storage, self.study_id).finished < n:
                for index in range(self.opts.workers):
                    self.spawn(index)
            self.loop()
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
            workers_started=self.spawned,
            worker_deaths=self.deaths,
            interrupts=self.interrupts,
            hard_kills=self.hard_kills,
        )

    def loop(self) -> None:
        last_progress = 0.0
        idle_since: float | None = None
        while self.workers or self.orphans:
            now = time.monotonic()
            if not self.workers:
                idle_since = idle_since or now
                if now - idle_since > 3 * ORPHAN_GRACE_S:
                    break  # an orphan that even SIGKILL does not end (D state) is not ours to wait for
            self.handle_requests(now)
            if self.fatal and self.stopping_since is None:
                self.stopping_since = now
                for worker in self.workers.values():
                    proctree.kill_group(worker.proc.pid, signal.SIGTERM)
            elif self.stopping_since is not None and now - self.stopping_since > STOP_GRACE_S:
                for worker in self.workers.values():
                    if not self.checkpointing(worker, now):
                        proctree.kill_group(worker.proc.pid, signal.SIGKILL)
            for worker in list(self.workers.values()):
                self.read_status(worker)
                code = worker.proc.poll()
                if code is not None:
                    self.on_exit(worker, code)
                elif self.stopping_since is None:
                    self.watch(worker, now)
            self.escalate_kills(now)
            if self.stopping_since is None and self.cancel_at is None:
                self.watch_system_memory()
            self.list_trees(now)
            if now - self.heartbeat_at > self.opts.heartbeat_s:
                self.heartbeat_at = now
                self.heartbeat()
            if self.on_progress and now - last_progress > PROGRESS_EVERY_S:
                last_progress = now
                self.on_progress(read_progress(self.storage, self.study_id))
            time.sleep(POLL_S)


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
    opts: RunOptions,
    on_progress: Callable[[Progress], None] | None = None,
    on_recovery: Callable[[Recovery], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> RunResult:
    """Run a guarded study to its ``n_trials`` with ``opts.workers`` worker processes.

    ``on_recovery`` hears, before workers start, which trials a dead run left RUNNING were
    reaped and which were enqueued again; ``on_notice`` hears stop and cancel as they happen.
    """
    return _Supervisor(opts, on_progress, on_recovery, on_notice).run()
