"""``optguard run``: prepare the storage, start N workers, enforce limits from outside.

Modelled on gunicorn's arbiter: signal handlers only count signals; the loop samples (status
pipes, process trees, memory, the storage) and acts on what the pure decisions in
``escalation``, ``exits`` and ``outcome`` say. The supervisor is a child subreaper: a daemon a
trial double-forks away is re-parented here, found, and ended; and its keeper ends whatever
the run started if the supervisor itself is killed.

Emergency checkpoints: a worker about to run its trial's ``on_interrupt`` callbacks reports
``checkpointing`` with its budget; until that budget (plus ``CHECKPOINT_MARGIN_S``) is spent,
no step that would end the worker is taken, except a kill for memory above the ceiling.

The run ends when the study has its trials: workers exit once it has, and the supervisor
stays while retries wait (it starts workers for them) or other hosts' trials run (it reaps
them if their hosts die). Exit codes: ``optguard.errors``; decided in ``outcome``.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from optguard import channel, gpus, proctree
from optguard.artifacts import artifact_dir
from optguard.config import RunOptions
from optguard.control import request_in, set_request
from optguard.early_stopping import patience_error, study_plateaued
from optguard.errors import (
    OptguardError,
    StorageError,
    UsageError,
    WorkerCrashError,
    WorkerStartError,
)
from optguard.gateway import serves
from optguard.gateway.server import Gateway
from optguard.guard import REASON_MEMORY, REASON_SYSTEM_MEMORY, Violation
from optguard.handover import offer, pending, ripe, take_handovers
from optguard.liveness import Proc, parse_owner, probe_trial
from optguard.outage import outage_of
from optguard.preflight import check_run_inputs
from optguard.progress import Progress, ProgressReader, read_progress
from optguard.recovery import Recovery, mark_interrupted, reap_stale, recover
from optguard.report import LIMITS_ATTR
from optguard.storage import TrialSlots, is_rdb, mask_url, open_storage, resolve_url
from optguard.study import (
    direction_names,
    resolve_directions,
    sampler_error,
    stored_directions,
)
from optguard.supervision.escalation import (
    REASON_CANCELLED,
    Step,
    Watched,
    decide,
    decide_cancel,
)
from optguard.supervision.exits import Exit, classify_exit, describe_exit
from optguard.supervision.keeper import start_keeper, tell_keeper
from optguard.supervision.orphans import ORPHAN_GRACE_S, Orphans
from optguard.supervision.outcome import Ended, fail_fast_error, incomplete_error
from optguard.supervision.poller import Poller
from optguard.supervision.workers import Worker, spawn_worker
from optguard.termination import TERMINATED_ATTR, TerminatorWatch, terminate_error
from optguard.timeline import SPOOL_EVERY_S, drop_spool, spool_path, write_spool
from optguard.worker import ATTR_PREFIX, REASON_INTERRUPTED, START_FAILURE

__all__ = ["RunResult", "run_study"]

POLL_S = 0.1  # memory sampling rate of each worker's tree: 10 Hz
PIDS_EVERY_S = 1.0  # how often each worker's descendants are listed again
REQUESTS_EVERY_S = 1.0  # stop/cancel requests in the storage
PROGRESS_EVERY_S = 2.0  # the progress display: a few aggregate queries
CHECKPOINT_MARGIN_S = 1.0  # past a worker's checkpoint budget: time to tell the trial
LINGER_S = 10.0  # a worker still running this long after its last trial is ended
EARLY_STOP_ATTR = "optguard.early_stopped"  # on the study: why --patience ended it
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
    interrupts: int  # trials ended by the interrupt step, as recorded on them
    hard_kills: int  # trials ended by the kill step, as recorded on them
    ended_by: str | None = None  # on purpose (--patience, study.stop()): the study is done


@dataclass
class _Signals:
    count: int = 0
    last: int = 0

    def handler(self, signum: int, _frame: FrameType | None) -> None:
        self.count += 1  # only flags: the loop acts on them
        self.last = signum


def prepare_study(opts: RunOptions) -> tuple[str, Any, Any, int, Recovery, tuple[str, ...]]:
    """Create the schema and the study once, then recover it, before any worker starts.

    Also returns the study's directions: an existing study's own when none were given, which
    the workers are then given too. Bad input (other directions than the study's, --patience
    or --sampler cmaes on a multi-objective study) is refused before the study is created or
    changed.
    """
    import optuna
    import sqlalchemy.exc

    url = resolve_url(opts.storage)
    storage = open_storage(
        url,
        create_schema=True,
        heartbeat_s=opts.heartbeat_s,
        outage_s=opts.storage_outage_s,
        gateway=opts.gateway and serves(url),
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        directions = resolve_directions(
            opts.directions, stored_directions(storage, opts.study), opts.study
        )
        refused = (
            patience_error(opts.patience, len(directions))
            or terminate_error(opts.terminate, len(directions))
            or sampler_error(opts.sampler, len(directions))
        )
        if refused is not None:
            raise UsageError(f"study {opts.study!r}: {refused}")
        study = optuna.create_study(
            study_name=opts.study, storage=storage, directions=list(directions),
            load_if_exists=True,
        )  # fmt: skip
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise StorageError(
            f"storage {mask_url(url)} refused the study: {type(exc).__name__}"
        ) from None
    # Another host may have created it meanwhile, with other directions.
    resolve_directions(directions, direction_names(study.directions), opts.study)
    slots = TrialSlots(storage, opts.study)
    try:
        with slots.lock():
            recovery = recover(study, storage, slots.study_id, opts.retry_pruned)
    finally:
        slots.close()
    return url, storage, study, slots.study_id, recovery, directions


def _interrupt_note(violation: Violation, esc: Any) -> str:
    if violation.reason == REASON_CANCELLED:
        return "cancel: no check within the grace period: interrupting the worker"
    if violation.reason == REASON_MEMORY and esc.memory_grace_s <= 0:
        return "no memory grace: interrupting the worker"
    if violation.reason == REASON_SYSTEM_MEMORY:
        return "interrupting the worker"
    return "no check within the grace period: interrupting the worker"


def _about(trial: Watched | None, event: dict[str, Any]) -> bool:
    """Whether a status event is about the trial the supervisor thinks the worker runs."""
    return trial is not None and trial.number == event.get("trial")


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
    return UsageError(message) if code == 2 else StorageError(message)


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
        self.run_id = f"{self.host}:{os.getpid()}:{time.time_ns()}"
        self.workers: dict[int, Worker] = {}
        self.by_uid: dict[str, Worker] = {}  # every worker this run started, exited ones too
        self.signals = _Signals()
        self.crashes: deque[float] = deque()
        self.spawned = 0
        self.deaths = 0
        self.interrupts = 0
        self.hard_kills = 0
        self.stopping = False  # fatal error: end every worker now
        self.draining = False  # stop or cancel: no new trial, no replacement worker
        self.cancelling = False
        self.cancelled_ids: set[int] = set()  # trials running when this run was cancelled
        # trials a SIGTERM to their worker ended: the scheduler signals every process of a
        # node, so the workers' may come before the supervisor's own
        self.interrupted_ids: set[int] = set()
        self.handing_over = False  # a SIGTERM: hand them over (optguard.handover)
        self.stopped_by: str | None = None  # a stop/cancel: exit 130
        self.ended_by: str | None = None  # --patience or study.stop(): exit 0
        self.signals_seen = 0
        self.requests_at = 0.0
        self.requested: str | None = None  # the study's stop or cancel request, last read
        # (trial ids its workers run, their pids): what the heartbeat beats for and spares
        self.beats: tuple[frozenset[int], frozenset[int]] = (frozenset(), frozenset())
        self.poller: Poller | None = None  # the periodic storage work, with a gateway
        self.heartbeat_at = 0.0
        self.progress_at = 0.0
        self.fatal: OptguardError | None = None
        self.orphans = Orphans(self.run_id, self._orphan_ended)
        self.pids_at = 0.0  # when the process trees were last listed
        self.oom_seen = proctree.oom_kills()
        self.first_ended: list[Ended] = []
        self.limits_written = False
        self.progress = Progress()
        self.keeper_pid = -1
        self.log_hint = "see the worker logs"
        self.any_ready = False
        self.unready_deaths = 0  # in a row, while no worker was ever ready
        self.keeper: Any = None
        self.kept: dict[int, bytes] = {}  # pids told to the keeper, with their start times
        self.terminator: TerminatorWatch | None = None  # --terminate, once the study is open
        self.evidence_dir: Path | None = None  # the artifact store, once the study is open

    # -- workers ---------------------------------------------------------------------------
    def spawn(self, index: int) -> None:
        self.spawned += 1
        uid = f"{index}.{self.spawned}"
        worker = spawn_worker(
            self.opts, index, uid, self.url, self.run_id, time.monotonic(), self.gateway
        )
        self.workers[index] = self.by_uid[uid] = worker
        _log.info("started worker %d (pid %d)", index, worker.proc.pid)

    def _log(self, worker: Worker, level: int, number: int | None, msg: str) -> None:
        worker.log.log(level, msg, extra={"trial": "-" if number is None else number})

    def read_status(self, worker: Worker, now: float) -> None:
        for event in worker.status.read():
            kind = event.get("event")
            if kind == "ready":
                worker.ready = self.any_ready = True
            elif kind == "start":
                worker.trial = Watched(event["trial"], event["trial_id"], event["started"])
                if self.cancelling:  # claimed as the cancel came: cancelled like the others
                    self.cancelled_ids.add(worker.trial.trial_id)
                    if self.handing_over:
                        self.hand_over()
                worker.checkpoint_until = 0.0  # the last trial's hold is not this one's
                self.write_limits()
            elif kind == "interrupted" and _about(worker.trial, event):
                worker.trial.acked = True  # type: ignore[union-attr]
            elif kind == "checkpointing":
                budget = float(event.get("budget_s", 0.0))
                worker.checkpoint_until = now + budget + CHECKPOINT_MARGIN_S
            elif kind == "end" and _about(worker.trial, event):
                if event.get("reason") == REASON_INTERRUPTED:  # a SIGTERM to the worker
                    self.interrupted_ids.add(worker.trial.trial_id)  # type: ignore[union-attr]
                if worker.trial.spooled_at:  # type: ignore[union-attr]
                    drop_spool(spool_path(worker.log_path))  # the worker has read it
                worker.trial = None
                ended = Ended(
                    event["trial"], event["state"], event.get("error"), event.get("enforcement")
                )
                self.trial_ended(worker, ended)
            elif kind == "exiting":
                worker.exiting_at = now
                worker.exit_why = str(event.get("why") or "done")
            elif kind == "storage_error":
                worker.storage_error = str(event.get("message") or "storage error")
            elif kind == "study_stop":
                self.end_on_purpose(f"trial #{event.get('trial')} called study.stop()")

    def write_limits(self) -> None:
        """``optguard report`` compares trials with these: written once trials really run
        with them, never by a command that runs nothing or fails."""
        if self.limits_written:
            return
        limits = self.opts.limits
        value = {"timeout_s": limits.timeout_s, "max_rss_bytes": limits.max_rss_bytes}
        if limits.max_vram_bytes is not None:  # the report's GPU sentence names it
            value["max_vram_bytes"] = limits.max_vram_bytes
        self.limits_written = self.outage.poll(
            lambda: self.storage.set_study_user_attr(self.study_id, LIMITS_ATTR, value) or True,
            False,  # the storage is down: written at a later trial's start
        )

    def trial_ended(self, worker: Worker, ended: Ended) -> None:
        if ended.enforcement == "interrupt":
            self.interrupts += 1
        elif ended.enforcement == "hard_kill":
            self.hard_kills += 1  # its SIGTERM step: the worker recorded the trial itself
        if len(self.first_ended) < self.opts.fail_fast:
            self.first_ended.append(ended)
            self.log_hint = f"see {worker.log_path}"
            error = fail_fast_error(self.first_ended, self.opts.fail_fast, self.log_hint)
            if error is not None and self.fatal is None:
                self.fatal = error

    # -- the watch: time and memory of each running trial ----------------------------------
    def list_trees(self, now: float) -> None:
        """Every worker's process tree, and the orphans re-parented here, from one listing of
        ``/proc`` per ``PIDS_EVERY_S``: the supervisor's main cost when trials are short."""
        if now - self.pids_at < PIDS_EVERY_S:
            return
        self.pids_at = now
        self.oom_seen = proctree.oom_kills()
        kids = proctree.children_map()
        for worker in self.workers.values():
            worker.pids = proctree.tree_pids(worker.proc.pid, kids) or [worker.proc.pid]
        live = {w.proc.pid for w in self.workers.values()} | {self.keeper_pid}
        self.orphans.sweep(now, kids.get(os.getpid(), []), self.by_uid, live)
        self.tell_keeper()

    def tell_keeper(self) -> None:
        """The workers' trees as just listed: the keeper ends them if this process dies,
        even a child whose environment lacks the run's marker."""
        new = {}
        for worker in self.workers.values():
            for pid in worker.pids:
                if pid not in self.kept:
                    start = proctree.start_time(pid)
                    if start is not None:
                        new[pid] = self.kept[pid] = start
        if len(self.kept) > 4096:  # a long run: forget those that are gone
            self.kept = {p: t for p, t in self.kept.items() if proctree.start_time(p) == t}
        if self.keeper is not None:
            tell_keeper(self.keeper, new)

    def _orphan_ended(self, owner: Worker, pid: int, trial: str | None) -> None:
        self._log(
            owner, logging.WARNING, None,
            f"Ended pid {pid} left running by trial #{trial} (re-parented to the supervisor)",
        )  # fmt: skip

    def measure(self, worker: Worker) -> int:
        memory = proctree.rss_of(worker.pids or [worker.proc.pid])
        limit = self.opts.limits.max_rss_bytes
        if limit is not None and len(worker.pids) > 1 and memory > limit * PSS_FROM:
            memory = proctree.pss_of(worker.pids)  # shared pages counted once, not per process
        worker.memory = memory
        return memory

    def measure_vram(self, worker: Worker, trial: Watched) -> int:
        """GPU memory of the worker's tree, from NVML; 0 without ``--max-vram`` or NVML."""
        if self.opts.limits.max_vram_bytes is None:
            return 0
        lib = gpus.nvml()
        if lib is None:
            return 0  # no outside enforcement: the worker's own checks (torch) remain
        vram = lib.memory_of(worker.pids or [worker.proc.pid])
        trial.vram_peak = max(trial.vram_peak, vram)
        return vram

    def watch(self, worker: Worker, now: float) -> None:
        trial = worker.trial
        if trial is None or worker.kill is not None:
            return
        memory = self.measure(worker)
        vram = self.measure_vram(worker, trial)
        elapsed = now - trial.started
        if self.evidence_dir is not None:
            trial.timeline.add(elapsed, memory)
            if now - max(trial.started, trial.spooled_at) >= SPOOL_EVERY_S:
                self.spool(worker, trial, now)
        if memory > trial.peak:
            trial.peak = memory
            if memory > trial.peak_sent * 1.02:
                trial.peak_sent = memory
                channel.send(
                    worker.control_fd, {"cmd": "peak", "trial": trial.number, "bytes": memory}
                )
        if self.cancelling:
            step = decide_cancel(trial, memory, elapsed, now, self.esc, worker.checkpoint_until)
        else:
            step = decide(
                trial, memory, elapsed, now, self.opts.limits, self.esc, worker.checkpoint_until,
                vram=vram,
            )
        if step is not None:
            self.act(worker, step[0], step[1], now)

    def spool(self, worker: Worker, trial: Watched, now: float) -> None:
        """The trial's timeline, for the worker to attach when it ends (``optguard.timeline``)."""
        trial.spooled_at = now
        try:
            write_spool(
                spool_path(worker.log_path), trial.trial_id, trial.started,
                trial.timeline.snapshot(),
            )  # fmt: skip
        except OSError:
            pass  # a full disk: the evidence loses its timeline, the run goes on

    def act(self, worker: Worker, step: Step, violation: Violation, now: float) -> None:
        trial = worker.trial
        if trial is None:
            return
        if self.evidence_dir is not None:
            self.spool(worker, trial, now)  # the sample that crossed the limit included
        if step is Step.SOFT:
            trial.violation, trial.violation_at = violation, now
            note = "cancel: " if violation.reason == REASON_CANCELLED else ""
            self.step(worker, "soft", violation, note + "pruning at its next check")
        elif step is Step.INTERRUPT:
            trial.violation, trial.interrupted_at = violation, now
            self.step(worker, "interrupt", violation, _interrupt_note(violation, self.esc))
        elif step is Step.KILL_NOW:
            self._log(
                worker, logging.WARNING, trial.number,
                f"Trial #{trial.number}: "
                f"{'GPU ' if violation.reason == gpus.REASON_GPU_MEMORY else ''}memory "
                f"{violation.rss_bytes / 1e6:.0f}MB is above the "
                f"ceiling {self.esc.memory_ceiling:g}x the limit "
                f"{violation.limit / 1e6:.0f}MB: killing at once",
            )  # fmt: skip
            self.begin_kill(worker, violation, now, "SIGKILL at once", immediate=True)
        elif step is Step.KILL_STUCK:
            self.begin_kill(
                worker, violation, now,
                f"no answer to the interrupt within {self.esc.kill_after_s:g}s (stuck in C): "
                "SIGKILL to the worker, SIGTERM to its children", stuck=True,
            )  # fmt: skip
        else:
            self.begin_kill(
                worker, violation, now, f"SIGTERM, SIGKILL after {self.esc.kill_after_s:g}s"
            )

    def step(self, worker: Worker, cmd: str, violation: Violation, note: str) -> None:
        """Log one escalation step in the worker's log and send it the command."""
        number = violation.trial_number
        self._log(
            worker, logging.WARNING, number,
            f"Trial #{number}: {violation.phrase} ({violation.detail}); {note} [{cmd}]",
        )  # fmt: skip
        worker.command(cmd, violation, signal.SIGUSR1)

    def watch_system_memory(self, now: float) -> None:
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
            trial.number, REASON_SYSTEM_MEMORY, now - trial.started, worker.memory, threshold
        )
        self._log(
            worker, logging.WARNING, trial.number,
            f"System RAM at {vm.percent:.1f}% > {self.esc.max_system_ram_pct:g}%: trial "
            f"#{trial.number} uses the most ({worker.memory / 1e6:.0f}MB)",
        )  # fmt: skip
        self.act(worker, Step.INTERRUPT, violation, now)

    # -- killing -----------------------------------------------------------------------------
    def begin_kill(
        self, worker: Worker, violation: Violation, now: float, how: str,
        immediate: bool = False, stuck: bool = False,
    ) -> None:  # fmt: skip
        worker.kill, worker.kill_at, worker.kill_now = violation, now, immediate
        self._log(
            worker, logging.ERROR, violation.trial_number,
            f"Trial #{violation.trial_number}: killing worker pid {worker.proc.pid} and its "
            f"process tree ({how}) [hard_kill]",
        )  # fmt: skip
        trial = worker.trial
        if immediate:
            peak = worker.sigkill_tree(f"memory above {self.esc.memory_ceiling:g}x --max-rss")
            worker.kill_escalated = True
        elif stuck:
            peak = proctree.freeze_peak(None, [worker.proc.pid])
            worker.sent = f"SIGKILL: no answer to the interrupt in {self.esc.kill_after_s:g}s"
            proctree.kill_pid(worker.proc.pid, signal.SIGKILL)
            worker.signal_tree(signal.SIGTERM)  # its children can still clean up
        else:
            worker.command("kill", violation, signal.SIGTERM)
            worker.signal_tree(signal.SIGTERM)
            return
        if trial is not None:
            trial.peak = max(trial.peak, peak)

    def end_worker(self, worker: Worker, why: str, now: float) -> None:
        """End a worker that runs no trial optguard must record (stop, cancel, start timeout,
        lingering, a fatal error): SIGTERM to its tree, SIGKILL ``--kill-after`` later."""
        if worker.ending is not None or worker.kill is not None:
            return
        worker.ending, worker.ending_at = why, now
        worker.signal_tree(signal.SIGTERM)

    def escalate_kills(self, now: float) -> None:
        for worker in self.workers.values():
            if worker.kill is not None and not worker.kill_escalated:
                hold = not worker.kill_now and now < worker.checkpoint_until
                if now - worker.kill_at > self.esc.kill_after_s and not hold:
                    worker.kill_escalated = True
                    peak = worker.sigkill_tree(f"--kill-after {self.esc.kill_after_s:g}s")
                    if worker.trial is not None:
                        worker.trial.peak = max(worker.trial.peak, peak)
            elif worker.ending is not None and now - worker.ending_at > self.esc.kill_after_s:
                if now >= worker.checkpoint_until and worker.sent is None:
                    worker.sigkill_tree(f"{worker.ending}, --kill-after")

    def check_workers(self, now: float) -> None:
        """Workers that never got ready, or that will not exit after their last trial."""
        for worker in self.workers.values():
            if not worker.ready and now - worker.spawned_at > self.opts.start_timeout_s:
                if self.fatal is None:
                    self.fatal = WorkerStartError(
                        f"worker {worker.index} not ready after {self.opts.start_timeout_s:g}s "
                        f"(--start-timeout): its objective's import hangs? see {worker.log_path}"
                    )
            elif worker.exiting_at is not None and now - worker.exiting_at > LINGER_S:
                if worker.ending is None:
                    self._log(
                        worker, logging.WARNING, None,
                        f"Worker still running {LINGER_S:g}s after its last trial (a non-daemon "
                        "thread or a blocking atexit handler?): ending its process tree",
                    )  # fmt: skip
                    why = f"still running {LINGER_S:g}s after its last trial"
                    self.end_worker(worker, why, now)

    # -- exits -------------------------------------------------------------------------------
    def mark_trial(
        self,
        worker: Worker,
        watched: Watched | None,
        state: Any,
        attrs: dict[str, Any],
    ) -> list[int]:
        """Finish the trial a dead worker left RUNNING: the one it reported (``watched``),
        else any trial RUNNING under its name (it died before reporting the start)."""
        return self.outage.poll(lambda: self._mark(worker, watched, state, attrs), [])

    def _mark(
        self, worker: Worker, watched: Watched | None, state: Any, attrs: dict[str, Any]
    ) -> list[int]:
        """``mark_trial``'s writes. Skipped while the storage is down, so the loop goes on
        enforcing limits: the dead owner's trial is then reaped once it is back."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        from optguard.storage import set_trial_user_attrs

        trial_id = watched.trial_id if watched is not None else None
        if trial_id is not None:
            candidates = [self.storage.get_trial(trial_id)]
        else:
            candidates = self.storage.get_all_trials(
                self.study_id, deepcopy=False, states=(TrialState.RUNNING,)
            )
        marked = []
        for trial in candidates:
            if trial.state != TrialState.RUNNING:
                continue
            if trial.user_attrs.get(ATTR_PREFIX + "worker") != worker.tag:
                continue
            try:
                self.attach_evidence(worker, watched, trial, state, attrs)
                set_trial_user_attrs(
                    self.storage, trial._trial_id, {ATTR_PREFIX + k: v for k, v in attrs.items()}
                )
                self.storage.set_trial_state_values(trial._trial_id, state)
            except UpdateFinishedTrialError:
                continue  # the worker told it just before it died
            marked.append(trial.number)
        return marked

    def attach_evidence(
        self, worker: Worker, watched: Watched | None, trial: Any, state: Any, attrs: dict[str, Any]
    ) -> None:
        """The timeline and log lines of a trial this supervisor finishes, before it does
        (``optguard.evidence``): every such trial was ended by the guard or lost a worker."""
        if self.evidence_dir is None:
            return
        from optguard.evidence import store_evidence, trial_log_lines

        points = watched.timeline.snapshot() if watched is not None else []
        why = attrs.get("error") or attrs.get("reason", "")
        lines = trial_log_lines(worker.log_path, trial.number) + [
            f"(supervisor) trial={trial.number} marked {state.name}: {why}"
        ]
        # Storage errors (an outage, polled) and UpdateFinishedTrialError (the worker told the
        # trial just before it died) propagate; anything else costs the evidence only, and the
        # trial is still marked. Warnings go to the worker's log, beside the trial's lines.
        why = store_evidence(
            self.evidence_dir, self.storage, trial, points, self.opts.limits, lines, worker.log
        )
        if why is not None:
            self._log(
                worker, logging.WARNING, trial.number,
                f"Trial #{trial.number}: evidence not stored: {why}",
            )  # fmt: skip
        drop_spool(spool_path(worker.log_path))

    def reap_worker(self, worker: Worker) -> int | None:
        """The worker's exit code once it exited (reaped here), with what ``/proc`` still
        tells of it (its CPU limit) read first; not while a claim of its own still runs
        (``Worker.claiming``)."""
        if not proctree.has_exited(worker.proc.pid) or worker.claiming():
            return None
        cpu_limit = proctree.hit_cpu_limit(worker.proc.pid)
        oom = proctree.oom_kills()
        code = worker.proc.wait()
        self.on_exit(worker, code, cpu_limit, oom > self.oom_seen >= 0)
        return code

    def on_exit(self, worker: Worker, code: int, cpu_limit: bool, oom: bool) -> None:
        from optuna.trial import TrialState

        del self.workers[worker.index]
        self.read_status(worker, time.monotonic())
        worker.close()
        trial, worker.trial = worker.trial, None  # whatever it ran is over: its orphans can go
        self.pids_at = 0.0  # look for them now
        how = describe_exit(code, sent=worker.sent, oom=oom, cpu_limit=cpu_limit)
        # A worker that left because something outside sent it SIGTERM (earlyoom, an admin)
        # did not finish its part: it is replaced like a dead one.
        left = worker.exiting_at is not None and (
            worker.exit_why != REASON_INTERRUPTED or self.draining or self.stopping
        )
        kind = classify_exit(
            code, ready=worker.ready, said_exiting=left,
            in_trial=trial is not None, killed=worker.kill is not None,
            ended=worker.ending is not None,
        )  # fmt: skip
        if kind is Exit.KILLED:
            self.record_kill(worker, trial, how)
        elif kind is Exit.RECYCLE:
            self._log(worker, logging.INFO, None, "Worker recycled: starting a fresh one")
        elif kind is Exit.START_FAILURE:
            self.fatal = self.fatal or _start_failure(worker.log_path, code)
            return
        elif kind is Exit.DONE:
            return
        else:
            stopping = kind is Exit.ENDED or self.draining or self.stopping
            reason = "interrupted" if stopping else "worker_died"
            during = f" during trial #{trial.number}" if trial is not None else ""
            detail = f"worker {worker.tag} {'ended' if stopping else 'died'}{during}: {how}"
            for number in self.mark_trial(
                worker, trial, TrialState.FAIL, {"reason": reason, "error": detail}
            ):
                line = f"Trial #{number} failed: {reason} ({detail})"
                self._log(worker, logging.ERROR, number, line)
            if worker.storage_error is not None and self.fatal is None:
                self.fatal = StorageError(worker.storage_error)  # past --storage-outage
            if stopping or self.fatal is not None:
                return
            self.deaths += 1
            if not self.any_ready:
                self.unready_deaths += 1
                if self.unready_deaths >= 2:  # its import kills it: replacing it loops for ever
                    self.fatal = WorkerStartError(
                        f"worker {worker.index} died twice before it was ready ({how}); "
                        f"see {worker.log_path}"
                    )
                    return
            self._log(worker, logging.ERROR, None, f"Worker died: {how}; starting a replacement")
            if self.too_many_crashes(how, worker):
                return
        if not self.stopping and not self.draining:
            self.spawn(worker.index)

    def record_kill(self, worker: Worker, trial: Any, how: str) -> None:
        from optuna.trial import TrialState

        violation = worker.kill
        if violation is None:
            return
        gpu = violation.reason == gpus.REASON_GPU_MEMORY  # its rss_bytes is GPU memory
        peak = max(trial.peak if trial else 0, 0 if gpu else violation.rss_bytes)
        vram_peak = max(trial.vram_peak if trial else 0, violation.rss_bytes if gpu else 0)
        attrs = {
            "reason": violation.reason,
            "elapsed_s": round(violation.elapsed_s, 3),
            "rss_bytes": violation.rss_bytes,
            "limit": violation.limit,
            **violation.limit_in_unit(),
            "enforcement": "hard_kill",
            "hard_kill": True,
            "pruned_by": "guard",
            "peak_rss_bytes": peak,
            "peak_mb": round(peak / 1e6, 1),
            **({"peak_vram_bytes": vram_peak, "peak_vram_mb": round(vram_peak / 1e6, 1)}
               if vram_peak else {}),  # fmt: skip
        }
        marked = self.mark_trial(worker, trial, TrialState.PRUNED, attrs)
        if marked:
            self.hard_kills += 1  # else the worker recorded it, and said so in its "end"
        line = replace(violation, enforcement="hard_kill").log_line()
        self._log(
            worker, logging.ERROR, violation.trial_number,
            f"{line} [hard_kill: worker {how}; "
            f"trial {'marked PRUNED' if marked else 'already finished'}]",
        )  # fmt: skip

    def too_many_crashes(self, how: str, worker: Worker) -> bool:
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

    # -- heartbeat and reaping ---------------------------------------------------------------
    def heartbeat(self) -> None:
        """Beat for this host's running trials (a worker stuck in C cannot beat for itself),
        then reap trials whose owners died, and retry them once. Not on a journal file: it
        has no heartbeat (this host's dead trials are reaped by the next run here)."""
        if not is_rdb(self.storage):
            return
        beating, own = self.beats  # as the loop last saw its workers (this may be a thread)
        for trial_id in beating:
            self.storage.record_heartbeat(trial_id)
        with self.slots.lock():  # two hosts reaping at once neither reap nor retry twice
            stale = reap_stale(self.study, self.storage, self.study_id, own)
        if stale.reaped and self.on_notice is not None:
            retried = ", ".join(f"#{n}" for n in stale.retried) or "none"
            self.on_notice(
                f"owner gone for trial(s) {', '.join(f'#{n}' for n in stale.reaped)}: marked "
                f"FAIL (interrupted); retrying {retried}"
            )

    def take_handovers(self) -> list[int]:
        """Enqueue the trials nodes stopped by their scheduler handed over, once."""
        with self.slots.lock():
            retried = take_handovers(self.study, self.storage, self.study_id)
        if retried:
            self.progress_at = 0.0  # read the progress now: the retries need workers
            if self.on_notice is not None:
                listed = ", ".join(f"#{n}" for n in retried)
                self.on_notice(f"trial(s) {listed} handed over by a stopped node: retrying")
        return retried

    def hand_over(self) -> None:
        """This node was stopped by a SIGTERM: list the trials it runs for the nodes still
        running, before they end (``optguard.handover``). The storage down: the next run
        of the study retries them (``interrupted`` ones; ``cancelled`` ones are lost)."""

        def offered() -> bool:
            with self.slots.lock():  # a node taking the list rewrites it
                offer(self.storage, self.study_id, self.run_id, handed)
            return True

        handed = self.cancelled_ids | self.interrupted_ids
        if self.outage.poll(offered, False):
            _log.info("trial id(s) %s handed over to the nodes still running", sorted(handed))
        else:
            _log.warning("storage down: trial id(s) %s not handed over", sorted(handed))

    # -- stop and cancel: Ctrl+C, SIGTERM, or a request in the study's storage ------------------
    def handle_requests(self, now: float) -> None:
        if self.signals.count > self.signals_seen:
            self.signals_seen = self.signals.count
            if self.signals.count == 1 and self.signals.last == signal.SIGINT:
                self.stop("Ctrl+C: no new trials, running trials finish; Ctrl+C again cancels them")
            else:
                # a SIGTERM is the scheduler ending this node: its trials go to the others
                self.handing_over = self.handing_over or self.signals.last == signal.SIGTERM
                self.cancel("cancelling: running trials are pruned at their next check")
        if now - self.requests_at > REQUESTS_EVERY_S:
            self.requests_at = now
            if self.opts.patience is not None and not self.draining:
                self.outage.poll(self.check_plateau, None)
            if self.opts.terminate and not self.draining:
                self.outage.poll(lambda: self.check_terminator(now), None)
            if self.poller is None:
                self.poll_requests()
            action = self.requested
            if action == "stop" and not self.draining:
                self.stop("optguard stop: no new trials, running trials finish")
            elif action == "cancel" and not self.cancelling:
                self.cancel("optguard cancel: running trials are pruned at their next check")

    # -- the periodic storage work: here, or in the poller's thread with a gateway ----------
    def storage_jobs(self) -> list[tuple[float, Callable[[], object]]]:
        return [
            (REQUESTS_EVERY_S, self.poll_requests),
            (self.opts.heartbeat_s, lambda: self.outage.poll(self.heartbeat, None)),
            (PROGRESS_EVERY_S, self.poll_progress),
        ]

    def poll_requests(self) -> None:
        """A stop or cancel request, and trials nodes stopped by their scheduler handed
        over: one read of the study's user attributes."""
        attrs = self.outage.poll(lambda: self.storage.get_study_user_attrs(self.study_id), None)
        if attrs is None:
            return  # the storage is down: the last answer stands
        self.requested = request_in(attrs)
        lists = pending(attrs)  # trials of nodes stopped by their scheduler
        if lists and not self.draining and self.outage.poll(lambda: ripe(self.storage, lists), 0):
            self.outage.poll(self.take_handovers, [])

    def poll_progress(self) -> None:
        self.progress = self.outage.poll(self.read_progress, self.progress)

    def check_plateau(self) -> None:
        """``--patience``: end the study on every host once the best value stops improving."""
        from optuna.trial import TrialState

        # through Optuna's cache of the study: the database is asked only what changed
        finished = self.study._storage.get_all_trials(
            self.study_id, deepcopy=False,
            states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL),
        )  # fmt: skip
        reason = study_plateaued(
            finished, self.opts.patience or 0, self.opts.min_delta,
            self.opts.directions == ("maximize",),
        )  # fmt: skip
        if reason is not None:
            self.storage.set_study_user_attr(self.study_id, EARLY_STOP_ATTR, reason)
            self.end_on_purpose(reason)

    def check_terminator(self, now: float) -> None:
        """``--terminate``: act on the last evaluation of Optuna's terminator (run in a thread
        on a snapshot, ``optguard.termination``); start the next when one is due. In the main
        thread: the watch quiets the terminator's warnings here, before the first one."""
        from optuna.trial import TrialState

        if self.terminator is None:
            self.terminator = TerminatorWatch(self.opts.directions[0])
        watch = self.terminator
        verdict = watch.collect()
        if verdict is not None and verdict.notice is not None:
            _log.warning("%s", verdict.notice)
            if self.on_notice is not None:
                self.on_notice(verdict.notice)
        if verdict is not None and verdict.reason is not None:
            self.storage.set_study_user_attr(self.study_id, TERMINATED_ATTR, verdict.reason)
            self.end_on_purpose(verdict.reason)
            return
        if self.poller is None and self.on_progress is None:
            if now - self.progress_at > PROGRESS_EVERY_S:
                self.progress_at = now  # the loop reads the progress only for on_progress
                self.progress = self.read_progress()
        # Due or not is decided on the progress's count (read every PROGRESS_EVERY_S); all the
        # complete trials (seconds at thousands) are read only for an evaluation that starts.
        watch.offer(
            now,
            self.progress.states.get("COMPLETE", 0),
            lambda: self.storage.get_all_trials(
                self.study_id, deepcopy=False, states=(TrialState.COMPLETE,)
            ),
        )

    def end_on_purpose(self, reason: str) -> None:
        """The study decided it is done (``--patience``, ``study.stop()``): every host stops
        taking trials, and this run exits 0."""
        if self.ended_by is not None:
            return
        self.ended_by = reason
        self.stop(reason, requested=False)  # this host first: then every other one
        self.outage.poll(lambda: set_request(self.storage, self.study_id, "stop"), None)

    def stop(self, notice: str, requested: bool = True) -> None:
        self.draining = True
        if requested and self.ended_by is None:
            self.stopped_by = self.stopped_by or notice
        now = time.monotonic()
        for worker in self.workers.values():
            self.read_status(worker, now)  # "ready" may wait unread: the loop was busy
            if not worker.ready:
                self.end_worker(worker, "stopped before it was ready", now)
                continue
            try:
                os.kill(worker.proc.pid, signal.SIGUSR2)
            except ProcessLookupError:
                pass  # exited; the loop reaps it
        if self.on_notice is not None:
            self.on_notice(notice)

    def cancel(self, notice: str) -> None:
        self.stop(notice)
        self.stopped_by = notice
        self.cancelling = True
        now = time.monotonic()
        for worker in self.workers.values():
            if worker.trial is not None:
                self.cancelled_ids.add(worker.trial.trial_id)
            # Not ready, or leaving after its last trial: nothing to record, end it now. One
            # between two trials may have just claimed the next (its start not read yet): it
            # got the stop, and a trial it started is cancelled like any other.
            if not worker.ready or worker.exiting_at is not None:
                self.end_worker(worker, "cancelled", now)
        if self.handing_over and self.cancelled_ids | self.interrupted_ids:
            self.hand_over()

    # -- loop --------------------------------------------------------------------------------
    def run(self) -> RunResult:
        start = time.monotonic()
        check_run_inputs(self.opts)  # before the storage is touched: bad input changes nothing
        groups = gpus.run_groups(self.opts.gpus, self.opts.gpus_per_worker)
        self.opts = replace(self.opts, limits=gpus.resolve_vram_limit(self.opts.limits, groups))
        unwatched = gpus.unwatched_warning(self.opts.limits, gpus.nvml_unavailable())
        if unwatched is not None and self.on_notice is not None:
            self.on_notice(unwatched)
        self.url, self.storage, self.study, self.study_id, recovery, directions = prepare_study(
            self.opts
        )
        # Workers get the study's directions: repeated to them, never a different default.
        self.opts = replace(self.opts, directions=directions)
        self.evidence_dir = artifact_dir(self.url, self.opts.artifacts)
        # The loop's own storage calls: skipped during an outage (limits are still enforced),
        # StorageError once it has lasted --storage-outage.
        self.outage = outage_of(self.storage)
        # every second on every host: what changed since the last read, not the whole study
        self.progress_reader = ProgressReader(self.storage, self.study_id)
        self.slots = TrialSlots(self.storage, self.opts.study)  # the study-wide lock
        # on a database server, the workers' storage calls run here: 2 connections a host
        self.gateway = Gateway(self.slots) if self.opts.gateway and serves(self.url) else None
        if self.on_recovery is not None:
            self.on_recovery(recovery)
        proctree.become_subreaper()
        keeper = self.keeper = start_keeper(self.run_id)
        self.keeper_pid = keeper.pid  # a child of this process, but no orphan to end
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.signal(s, self.signals.handler) for s in handled}
        try:
            self.progress = self.read_progress()
            if self.gateway is not None:  # the loop must not wait behind the workers' calls
                self.poller = Poller(self.storage_jobs())
                self.poller.start()
            if self.has_work():
                for index in range(self.opts.workers):
                    self.spawn(index)
            self.loop()
        except StorageError as exc:
            self.fatal = self.fatal or exc
            self.shutdown()
        finally:
            if self.poller is not None:
                self.poller.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.orphans.kill_all()
            proctree.become_subreaper(False)
            self.slots.close()
            if keeper.stdin is not None:
                keeper.stdin.close()  # the keeper sweeps what is left of this run, then exits
            keeper.wait()
        if isinstance(self.fatal, StorageError):
            self.fail_own_trials()
        stopped = self.signals.count > 0 or self.stopped_by is not None or self.ended_by
        if self.fatal is None and not stopped:
            self.fatal = fail_fast_error(
                self.first_ended, min(self.opts.fail_fast, len(self.first_ended)), self.log_hint
            )  # a run that ended fewer trials than --fail-fast, every one failing alike
        if self.fatal is not None:
            raise self.fatal
        progress = read_progress(self.storage, self.study_id)
        if self.on_progress:
            self.on_progress(progress)
        result = RunResult(
            progress=progress,
            n_trials=self.opts.n_trials,
            seconds=time.monotonic() - start,
            interrupted=self.signals.count > 0 or self.stopped_by is not None,
            workers_started=self.spawned,
            worker_deaths=self.deaths,
            interrupts=self.interrupts,
            hard_kills=self.hard_kills,
            ended_by=self.ended_by,
        )
        if not result.interrupted and self.ended_by is None:
            error = incomplete_error(progress, self.opts.n_trials)
            if error is not None:
                raise error
        return result

    def read_progress(self) -> Progress:
        return self.progress_reader.read()

    def has_work(self) -> bool:
        """Whether this host should run workers: trials are missing or retries wait."""
        n = self.opts.n_trials
        waiting = self.progress.states.get("WAITING", 0)
        return n is None or waiting > 0 or self.progress.finished + self.progress.running < n

    def fail_own_trials(self) -> None:
        """After a storage error: one last try to FAIL the trials this run's workers left
        RUNNING (a full disk may take these small writes once the log was emptied)."""
        from optuna.trial import TrialState

        tags = {w.tag for w in self.by_uid.values()}
        try:
            running = self.storage.get_all_trials(
                self.study_id, deepcopy=False, states=(TrialState.RUNNING,)
            )
            for trial in running:
                if trial.user_attrs.get(ATTR_PREFIX + "worker") in tags:
                    mark_interrupted(self.storage, trial._trial_id, str(self.fatal))
        except StorageError:
            pass  # deliberately best effort: a restart reaps what is left RUNNING

    def shutdown(self) -> None:
        """The storage is gone for good: end the workers without recording anything."""
        for worker in list(self.workers.values()):
            worker.sigkill_tree("the storage is unreachable")
            worker.proc.wait()
            worker.close(judged=False)
        self.workers.clear()

    def idle(self, now: float) -> bool:
        """No worker runs: whether the run is over. It is not while retries wait (workers are
        started for them) or other hosts' trials run (they may die and need reaping)."""
        if self.orphans:
            return False
        if self.fatal is not None or self.draining or self.stopping:
            return True
        if self.poller is None and now - self.progress_at > PROGRESS_EVERY_S:
            self.progress_at = now
            self.poll_progress()
        if self.progress.states.get("WAITING", 0) > 0:
            for index in range(self.opts.workers):
                self.spawn(index)
            return False
        # Other hosts' running trials are waited for where a heartbeat can tell a dead host.
        # A journal file has none: only this host's trials whose owner is alive are waited
        # for (another run here); waiting on other hosts could last for ever (exit 6).
        if self.progress.running and is_rdb(self.storage):
            return False
        if self.progress.running and self.outage.poll(self.live_here, False):
            return False
        # the last look before the end: a node stopped meanwhile may have left trials to run
        if self.outage.poll(self.take_handovers, []):
            self.progress_at = now
            # a whole read: the poller's thread may be using the incremental reader
            self.progress = self.outage.poll(
                lambda: read_progress(self.storage, self.study_id), self.progress
            )
            return not self.progress.states.get("WAITING", 0) and not self.progress.running
        return True

    def live_here(self) -> bool:
        """Whether a RUNNING trial of the study is run by a live process of this host."""
        from optuna.trial import TrialState

        host = socket.gethostname()
        running = self.storage.get_all_trials(
            self.study_id, deepcopy=False, states=(TrialState.RUNNING,)
        )
        for trial in running:
            owner = parse_owner(trial.user_attrs.get(ATTR_PREFIX + "worker"))
            if owner is not None and owner.host == host:
                if probe_trial(owner, trial) is Proc.RUNNING:
                    return True
        return False

    def loop(self) -> None:
        orphans_since: float | None = None
        while True:
            now = time.monotonic()
            if not self.workers:
                if self.orphans:
                    orphans_since = orphans_since or now
                    if now - orphans_since > 3 * ORPHAN_GRACE_S:
                        break  # an orphan SIGKILL does not end (D state) is not ours to wait for
                elif self.idle(now):
                    break
            self.handle_requests(now)
            if self.fatal is not None and not self.stopping:
                self.stopping = True
                for worker in self.workers.values():
                    self.end_worker(worker, "the run is ending", now)
            for worker in list(self.workers.values()):
                self.read_status(worker, now)
                if self.reap_worker(worker) is None and not self.stopping:
                    self.watch(worker, now)
            self.escalate_kills(now)
            self.check_workers(now)
            if not self.stopping and not self.cancelling:
                self.watch_system_memory(now)
            self.list_trees(now)
            self.beats = (
                frozenset(w.trial.trial_id for w in self.workers.values() if w.trial is not None),
                frozenset(w.proc.pid for w in self.workers.values()),
            )
            if self.poller is not None:
                if self.poller.error is not None:
                    raise self.poller.error
            elif now - self.heartbeat_at > self.opts.heartbeat_s:
                self.heartbeat_at = now
                self.outage.poll(self.heartbeat, None)
            if self.on_progress and now - self.progress_at > PROGRESS_EVERY_S:
                self.progress_at = now
                if self.poller is None:
                    self.poll_progress()
                self.on_progress(self.progress)
            self.wait_events(POLL_S)

    def wait_events(self, timeout: float) -> None:
        """Sleep until the next tick, reading status events as they come: a worker's
        ``study.stop()`` or interrupt acknowledgement is acted on at once, not a tick later."""
        deadline = time.monotonic() + timeout
        while True:
            readers = {w.status.fd: w for w in self.workers.values() if not w.status.eof}
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if not readers:
                time.sleep(left)
                return
            ready, _, _ = select.select(list(readers), [], [], left)
            for fd in ready:
                self.read_status(readers[fd], time.monotonic())


def run_study(
    opts: RunOptions,
    on_progress: Callable[[Progress], None] | None = None,
    on_recovery: Callable[[Recovery], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> RunResult:
    """Run a guarded study to its ``n_trials`` with ``opts.workers`` worker processes.

    ``on_recovery`` hears, before workers start, which trials a dead run left RUNNING were
    reaped and which were enqueued again; ``on_notice`` hears stop and cancel as they happen.
    Raises an ``OptguardError`` for every outcome but "the study has its trials" (or a stop).
    """
    return _Supervisor(opts, on_progress, on_recovery, on_notice).run()
