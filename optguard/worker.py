"""One worker process: claim a trial, run it under the guard, clean up, tell, repeat.

``optguard run`` starts N of these as ``optguard worker``; the same command can be started by
hand on another host or by a scheduler, since all coordination goes through the storage.
Under a supervisor the worker also reports each trial's start and end on a status pipe and
obeys the supervisor's commands (see ``optguard.channel``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import signal
import socket
import threading
import time
import traceback
from dataclasses import dataclass, replace
from types import FrameType
from typing import Any, Callable

import optuna
import psutil
from optuna.exceptions import UpdateFinishedTrialError
from optuna.study._tell import _tell_with_warning
from optuna.trial import TrialState

from optguard import channel, gpus, leftovers, proctree
from optguard import guard as guard_mod
from optguard.artifacts import ARTIFACT_DIR_ENV, CHECKPOINT_STORE_ENV, artifact_dir
from optguard.checkpointing import (
    CHECKPOINT_DIR_ENV,
    clear_interrupt_callbacks,
    has_interrupt_callbacks,
    run_interrupt_callbacks,
)
from optguard.cleanup import release_memory
from optguard.config import RunOptions
from optguard.control import read_request, set_request
from optguard.errors import OptguardError, StorageError
from optguard.gateway.client import GatewaySlots, take_gateway
from optguard.guard import GuardPruned, TrialGuard, Violation
from optguard.limits import format_against, format_gb
from optguard.logs import set_trial, worker_log_path, worker_logger
from optguard.memory import current_rss, peak_rss, reset_peak
from optguard.objective import error_line, load_objective
from optguard.outage import Outage
from optguard.preflight import check_sampler
from optguard.storage import (
    TrialSlots,
    mask_url,
    open_storage,
    resolve_url,
    set_closing_attrs,
    set_trial_user_attrs,
)
from optguard.storage_calls import in_storage_call, on_leaving
from optguard.study import (
    direction_names,
    make_pruner,
    make_sampler,
    resolve_directions,
    stored_directions,
    worker_seed,
)
from optguard.threads import available_cpus, worker_summary
from optguard.timeline import read_spool, spool_path

__all__ = ["run_worker", "WorkerIdentity", "ATTR_PREFIX", "START_FAILURE", "EXIT_RECYCLE"]

ATTR_PREFIX = "optguard."
START_FAILURE = "Worker cannot start:"
REASON_INTERRUPTED = "interrupted"
EXIT_RECYCLE = 75  # "replace me": the supervisor starts a fresh worker, not counted as a death
LEFTOVER_GRACE_S = 2.0  # SIGTERM to SIGKILL for processes a trial left running
# The stop/cancel flag is read at most this often (one storage read), as the supervisor does:
# with short trials a read before every trial would be a large part of the work.
CONTROL_POLL_S = 1.0


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


def _as_float(result: Any) -> tuple[float | None, str | None]:
    """One number of the objective's result as a float, or why it cannot be one."""
    if isinstance(result, (str, bytes)) or result is None:
        return None, f"a non-number: {type(result).__name__} {result!r:.40}"
    try:
        value = float(result)
    except (TypeError, ValueError):
        return None, f"a non-number: {type(result).__name__}"
    except OverflowError:  # an int past 1.8e308: a failed trial, not a dead worker
        return None, f"a {type(result).__name__} too large for a float"
    if math.isnan(value):
        return None, "NaN"
    return value, None


def _as_value(result: Any, n_objectives: int = 1) -> tuple[float | list[float] | None, str | None]:
    """The objective's result as a float (one objective) or a list of ``n_objectives`` floats,
    or why it cannot be: checked here so the trial fails with ``optguard.error`` saying why,
    where ``study.tell`` would fail it with only a warning."""
    if n_objectives == 1:
        value, why = _as_float(result)
        return value, None if why is None else f"objective returned {why}"
    if isinstance(result, (str, bytes, dict)) or not hasattr(result, "__len__"):
        return None, (
            f"objective returned {type(result).__name__} for a study with {n_objectives} "
            f"objectives: return a sequence of {n_objectives} numbers"
        )
    try:
        items = list(result)
    except TypeError:  # a 0-d array has __len__ but no items
        items = None
    if items is None or len(items) != n_objectives:
        got = "a 0-d array" if items is None else f"{len(items)} value(s)"
        return None, f"objective returned {got} for a study with {n_objectives} objectives"
    values = []
    for i, item in enumerate(items, 1):
        value, why = _as_float(item)
        if why is not None:
            return None, f"objective returned {why} for objective {i} of {n_objectives}"
        values.append(value)
    return values, None


def _shown(value: float | list[float] | None) -> str:
    """A trial's value(s) in the worker log."""
    if value is None:
        return "-"
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:.6g}" for v in value) + "]"
    return f"{value:.6g}"


class _Supervised:
    """Signals and supervisor commands, as seen from inside the worker.

    SIGTERM/SIGINT (a scheduler, the supervisor's kill step, Ctrl+C on a worker run by hand):
    take no new trial and end the running one now, as an interrupt does, so its emergency
    checkpoint callbacks run before a SIGKILL follows (a second SIGINT raises
    ``KeyboardInterrupt``). SIGUSR2: take no new trial, let the running one finish (a graceful
    stop). SIGUSR1: a command waits on the control pipe. An ``interrupt`` raises
    ``GuardPruned`` right in the main thread when the objective is running: the handlers here
    that do more than set a flag, because interrupting a trial stuck in a loop, a sleep or a
    lock wait is their whole point. The callbacks run later, in ``_TrialRunner``.
    """

    def __init__(self) -> None:
        status = os.environ.pop(channel.STATUS_FD_ENV, None)
        control = os.environ.pop(channel.CONTROL_FD_ENV, None)
        self.status_fd = int(status) if status else None
        self.control = channel.LineReader(int(control)) if control else None
        self.stop_reason: str | None = None
        self.ready = False
        self.guard: TrialGuard | None = None
        self.in_objective = False
        self.tree_peak = 0
        self.command: Violation | None = None  # the trial's interrupt or kill, kill winning
        self.deferred: Violation | None = None  # an interrupt that came inside a storage call

    def install(self) -> None:
        parent = os.environ.pop(channel.SUPERVISOR_ENV, "")
        if parent.isdigit():
            # No supervisor, no enforcement: when it dies the run has died as a whole.
            proctree.die_with_parent(int(parent))
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGUSR1, self._on_command)
        signal.signal(signal.SIGUSR2, self._on_stop)
        on_leaving(self._raise_deferred)
        os.register_at_fork(after_in_child=self._in_child)

    def _in_child(self) -> None:
        """A process the objective forks must not inherit the worker's role."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(signum, signal.SIG_DFL)
        for fd in (self.status_fd, self.control.fd if self.control else None):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass  # already closed in this child
        self.status_fd = None
        self.control = None

    def report(self, event: str, **fields: Any) -> None:
        if self.status_fd is not None:
            channel.send(self.status_fd, {"event": event, **fields})

    def begin(self, guard: TrialGuard) -> Violation | None:
        """Watch ``guard``'s trial; returns the interrupt a SIGTERM asked for before the trial
        began (between the claim and now), which must end it before the objective starts:
        an objective that never checks would otherwise run on with the SIGTERM lost."""
        self.guard = guard
        self.tree_peak = 0
        self.command = None
        self.deferred = None
        if self.stop_reason != REASON_INTERRUPTED:
            return None
        return replace(guard.stop_violation(REASON_INTERRUPTED), enforcement="interrupt")

    def end(self) -> None:
        """Read what is left on the control pipe (peaks), with the command signals blocked."""
        blocked = {signal.SIGUSR1, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            self._apply(self._drain(), raise_now=False)
        finally:
            self.guard = None
            self.deferred = None
            signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)

    def _drain(self) -> list[dict[str, Any]]:
        return self.control.read() if self.control is not None else []

    def _on_term(self, signum: int, _frame: FrameType | None) -> None:
        if (self.stop_reason is not None and signum == signal.SIGINT) or not self.ready:
            raise KeyboardInterrupt  # not ready: the objective's import hangs; leave it now
        self.stop_reason = REASON_INTERRUPTED
        self._apply(self._drain(), raise_now=False)
        guard = self.guard
        if guard is None:
            return
        guard.request_stop(guard.stop_violation(REASON_INTERRUPTED))
        stop = self.command or guard.stop_requested  # a command already read wins
        if self.in_objective and stop is not None:
            if stop.enforcement == "check":
                stop = replace(stop, enforcement="interrupt")
            self._raise_or_defer(stop)

    def _raise_or_defer(self, stop: Violation) -> None:
        """End the objective now, or, inside a storage call, as soon as it is left
        (``optguard.storage_calls``)."""
        if in_storage_call():
            self.deferred = stop
            return
        raise GuardPruned(stop)

    def _raise_deferred(self) -> None:
        """The storage hook: the main thread left a storage call that an interrupt came in."""
        stop = self.deferred
        if stop is None or threading.current_thread() is not threading.main_thread():
            return
        self.deferred = None
        if self.in_objective:
            raise GuardPruned(stop)

    def _on_stop(self, _signum: int, _frame: FrameType | None) -> None:
        self.stop_reason = self.stop_reason or "stopped"  # the running trial finishes

    def _on_command(self, _signum: int, _frame: FrameType | None) -> None:
        self._apply(self._drain(), raise_now=self.in_objective)

    def _apply(self, messages: list[dict[str, Any]], raise_now: bool) -> None:
        guard = self.guard
        if guard is None:
            return
        interrupt: Violation | None = None
        for msg in messages:
            if msg.get("trial") != guard.number:
                continue  # about a trial this worker already finished
            cmd = msg.get("cmd")
            if cmd == "peak":
                self.tree_peak = max(self.tree_peak, int(msg["bytes"]))
                continue
            violation = Violation(
                guard.number,
                str(msg["reason"]),
                float(msg["elapsed_s"]),
                int(msg["rss_bytes"]),
                float(msg["limit"]),
                enforcement={"soft": "check", "interrupt": "interrupt"}.get(cmd, "hard_kill"),
            )
            guard.request_stop(violation)
            if cmd == "interrupt":
                interrupt = violation
            if cmd == "kill" or (cmd == "interrupt" and self.command is None):
                self.command = violation
        if interrupt is not None:
            # The supervisor waits for this before giving the worker --kill-after: a worker
            # stuck in C never gets here, and is killed sooner.
            self.report("interrupted", trial=guard.number)
            if raise_now:
                self._raise_or_defer(interrupt)


@dataclass(frozen=True)
class _Evidence:
    """What the worker knows of a trial's memory, for its evidence (``_attach_evidence``)."""

    started: float  # the trial's start as the supervisor's spool names it
    duration: float
    peak: int
    violation: Violation | None

    def samples(self) -> list[tuple[float, int]]:
        """The worker's own sample at a check that ended the trial: the supervisor, sampling
        10 times a second and spooling every second, may not have it. Steps the supervisor
        took (interrupt, kill) are spooled by it; GPU memory is not this timeline's."""
        v = self.violation
        if v is None or v.enforcement != "check" or v.reason == guard_mod.REASON_GPU_MEMORY:
            return []
        return [(v.elapsed_s, v.rss_bytes)] if v.rss_bytes else []


class _TrialRunner:
    def __init__(
        self,
        study: optuna.Study,
        storage: optuna.storages.RDBStorage,
        objective: Callable[[optuna.trial.Trial], Any],
        opts: RunOptions,
        identity: WorkerIdentity,
        log: logging.Logger,
        supervised: _Supervised,
        url: str,
    ) -> None:
        self.study = study
        self.storage = storage
        self.objective = objective
        self.opts = opts
        self.identity = identity
        self.log = log
        self.supervised = supervised
        self.n_objectives = len(study.directions)  # one storage read, not one per trial
        # Children alive before the first trial (a pool the objective's module started) are
        # the objective's own, by pid and start time (a pid can be reused); of the processes
        # started during trials, only the pools the worker still holds are kept after them.
        self.own_children = leftovers.start_times(psutil.Process().children(recursive=True))
        # Pipes and sockets held before any trial (stdio, supervisor, storage): a child that
        # shares only these inherited them from a fork; it is not connected to a pool.
        self.own_channels = set((proctree.channels_of(os.getpid()) or {}).values())
        self.kept_pools: set[int] = set()  # already logged as kept
        self.last_final_rss = 0
        self._announce_study_stop()
        # Where optguard.checkpoints() roots its directories, here and in the trials' children.
        os.environ[CHECKPOINT_DIR_ENV] = str(opts.checkpoint_dir.absolute())
        os.environ[CHECKPOINT_STORE_ENV] = opts.checkpoint_store
        self.artifact_dir = artifact_dir(url, opts.artifacts)
        self.log_path = worker_log_path(opts.log_dir, opts.study, identity.host, identity.index)
        self.log_offset: int | None = None  # where the log ended when the trial began
        if self.artifact_dir is not None:
            os.environ[ARTIFACT_DIR_ENV] = str(self.artifact_dir)
        else:
            os.environ.pop(ARTIFACT_DIR_ENV, None)

    def owner_attrs(self) -> dict[str, Any]:
        """Written with the trial's creation, in the same transaction (``ask_owned``)."""
        attrs: dict[str, Any] = {ATTR_PREFIX + "worker": self.identity.tag}
        if self.supervised.status_fd is not None:
            attrs[ATTR_PREFIX + "beats"] = True  # its supervisor beats for it: see liveness
        if self.opts.tag is not None:
            attrs[ATTR_PREFIX + "tag"] = self.opts.tag
        return attrs

    def _record_violation(self, trial: optuna.trial.Trial, violation: Violation) -> None:
        self.log.warning(violation.log_line() + f" [{violation.enforcement}]")
        self.set_attrs(
            trial,
            {
                "reason": violation.reason,
                "elapsed_s": round(violation.elapsed_s, 3),
                "rss_bytes": violation.rss_bytes,
                "limit": violation.limit,
                # the same limit in a name that says its unit (dashboards show raw numbers)
                **violation.limit_in_unit(),
                "enforcement": violation.enforcement,
                # The kill step's SIGTERM ended a trial still able to run Python.
                **({"hard_kill": True} if violation.enforcement == "hard_kill" else {}),
            },
        )
        if violation.reason in (*guard_mod.MEMORY_REASONS, guard_mod.REASON_GPU_MEMORY):
            release_memory()  # give the memory back before the pruned trial is told

    def _oom(self, guard: TrialGuard, reason: str) -> Violation:
        """The objective ran out of memory: what it held then, against the limit if any."""
        limits = self.opts.limits
        if reason == gpus.REASON_GPU_MEMORY:
            used = max(gpus.own_gpu_memory() or 0, gpus.torch_reserved(peak=True) or 0)
            limit = limits.max_vram_bytes or 0
        else:
            used, limit = current_rss(), limits.max_rss_bytes or 0
        return replace(guard.stop_violation(reason, used, float(limit)),
                       enforcement=guard_mod.ENFORCEMENT_OOM)  # fmt: skip

    def run(self, trial: optuna.trial.Trial) -> TrialState:
        number = trial.number
        set_trial(number)
        guard = TrialGuard(trial, self.opts.limits)
        reset_peak()
        gpus.reset_torch_peak()
        self.supervised.report(
            "start", trial=number, trial_id=trial._trial_id, started=guard.started
        )
        self.log_offset = None
        if self.artifact_dir is not None:
            with contextlib.suppress(OSError):  # no log to measure: its tail is read instead
                self.log_offset = self.log_path.stat().st_size
        self.log.info("Trial #%d started", number)
        guard.install()
        pending = self.supervised.begin(guard)
        os.environ[channel.TRIAL_ENV] = str(number)
        value: float | list[float] | None = None
        error: str | None = None
        oom_error: str | None = None
        violation: Violation | None = None
        state = TrialState.FAIL
        try:
            self.supervised.in_objective = True
            # As inside study.optimize: trial.study.stop() is allowed, and ends the study.
            self.study._thread_local.in_optimize_loop = True
            try:
                if pending is not None:
                    raise GuardPruned(pending)
                result = self.objective(trial)
            finally:
                self.supervised.in_objective = False
                self.study._thread_local.in_optimize_loop = False
        except GuardPruned as exc:
            state, violation = TrialState.PRUNED, exc.violation
        except optuna.TrialPruned as exc:
            state = TrialState.PRUNED
            self.log.info("Trial #%d pruned by the objective or pruner: %s", number, str(exc) or "-")
        except SystemExit as exc:
            error = f"objective called sys.exit({exc.code!r})"
        except KeyboardInterrupt:
            error = "interrupted by Ctrl+C"
        except StorageError:
            raise  # refused, or down past --storage-outage: not the objective's bug
        except Exception as exc:  # the objective's own bug: the trial fails, the worker goes on
            oom = gpus.oom_reason(exc)  # an out-of-memory error: recorded as the guard's own
            if oom is not None:
                state, violation = TrialState.PRUNED, self._oom(guard, oom)
                oom_error = error_line(exc)  # for --fail-fast: every trial may run out alike
                self.set_attrs(trial, {"error": oom_error})
            else:
                error = error_line(exc)
            for line in traceback.format_exc().rstrip().splitlines():
                self.log.info("traceback| %s", line)
        else:
            value, error = _as_value(result, self.n_objectives)
            if error is None:
                state = TrialState.COMPLETE
        finally:
            guard.uninstall()
        duration = guard.elapsed()
        if violation is not None:
            self._emergency_checkpoints(number)
        clear_interrupt_callbacks()
        if violation is not None:
            if violation.enforcement != "check":
                violation = replace(violation, elapsed_s=duration)
            self._record_violation(trial, violation)
        if error is not None:
            self.log.error("Trial #%d failed: %s", number, error)
            self.set_attrs(trial, {"error": error})
        os.environ.pop(channel.TRIAL_ENV, None)
        self._end_leftovers(number)
        self.supervised.end()
        # The kernel's exact peak of this process; the tree's, sampled by the supervisor.
        peak = max(peak_rss(), guard.peak_rss, self.supervised.tree_peak)
        attrs: dict[str, Any] = {"peak_rss_bytes": peak} if peak else {}
        vram = max(guard.peak_vram, gpus.torch_reserved(peak=True) or 0)
        if violation is not None and violation.reason == gpus.REASON_GPU_MEMORY:
            vram = max(vram, violation.rss_bytes)  # the supervisor's figure for the tree
        if vram:
            attrs.update(peak_vram_bytes=vram, peak_vram_mb=round(vram / 1e6, 1))
        if state == TrialState.PRUNED:  # the two look alike in optuna-dashboard otherwise
            attrs["pruned_by"] = "guard" if violation is not None else "pruner"
        evidence = None
        if self.artifact_dir is not None and (violation is not None or self.opts.artifacts_all):
            evidence = _Evidence(guard.started, duration, peak, violation)
        self._finish(trial, state, value, attrs, evidence)
        self.log.info(
            "Trial #%d finished: state=%s value=%s duration=%.2fs",
            number,
            state.name,
            _shown(value),
            duration,
        )
        self.supervised.report(
            "end", trial=number, state=state.name, error=error or oom_error,
            enforcement=violation.enforcement if violation is not None else None,
            reason=violation.reason if violation is not None else None,
        )  # fmt: skip
        if self.study._stop_flag:
            self._study_stop(number)
        set_trial(None)
        return state

    def _announce_study_stop(self) -> None:
        """Tell the supervisor when ``trial.study.stop()`` is called, not when the trial ends:
        it stops this host's other workers meanwhile, so none claims a trial after the call."""
        stop = self.study.stop

        def announcing_stop() -> None:
            stop()
            self.supervised.report("study_stop", trial=self.guard_number())

        self.study.stop = announcing_stop  # type: ignore[method-assign]

    def guard_number(self) -> int | None:
        guard = self.supervised.guard
        return guard.number if guard is not None else None

    def _study_stop(self, number: int) -> None:
        """``trial.study.stop()`` ran in the objective: as under ``study.optimize`` no new
        trial starts, here on every host (the study's stop request, set by the supervisor, or
        by this worker when it runs without one)."""
        self.study._stop_flag = False
        self.supervised.stop_reason = f"study.stop() in trial #{number}"
        self.log.info("Trial #%d called study.stop(): no new trials", number)
        if self.supervised.status_fd is None:  # else the supervisor heard it at the call
            set_request(self.storage, self.study._study_id, "stop")

    def _emergency_checkpoints(self, number: int) -> None:
        """The objective's ``on_interrupt`` callbacks, within ``--checkpoint-budget``.

        The supervisor hears ``checkpointing`` first and holds its kill step until the budget
        is spent; a callback still running then is abandoned (logged) and the trial is told.
        """
        if not has_interrupt_callbacks():
            return
        budget = self.opts.checkpoint_budget_s
        self.supervised.report("checkpointing", trial=number, budget_s=budget)
        self.log.info(
            "Trial #%d: running emergency checkpoint callbacks (budget %gs)", number, budget
        )
        run_interrupt_callbacks(budget, self.log)

    def _end_leftovers(self, number: int) -> None:
        """End what the trial started and left running (a server, a ``sleep 1000``, a dropped
        pool's workers); keep the pools the worker still holds (``optguard.leftovers``)."""
        if not proctree.has_children():
            self.kept_pools.clear()
            return  # the common case, one syscall instead of a scan of /proc
        try:
            children = psutil.Process().children(recursive=True)
        except psutil.Error:
            return  # cannot list: nothing to end
        me, keep, limit = os.getpid(), self.opts.keep_pools, self.opts.limits.max_rss_bytes
        # What kept processes may hold: the limit less the worker's memory after its last
        # cleanup (now it may still hold the trial's garbage), or now before the first one.
        room = None if limit is None else limit - (self.last_final_rss or current_rss())
        channels = leftovers.worker_channels(me, self.own_channels)
        facts = leftovers.gather(children, self.own_children, channels, room, look=keep)
        verdicts = leftovers.decide(facts, me, keep, room)
        pools = {pid for pid, v in verdicts.items() if v.why == leftovers.KEPT_POOL}
        new = sorted(pools - self.kept_pools)
        self.kept_pools = pools
        if new:
            self.log.info(
                "Trial #%d: keeping %d process(es) for the next trials (pids %s: %s; "
                "--no-keep-pools ends them)",
                number, len(new), ",".join(map(str, new)), leftovers.KEPT_POOL,
            )  # fmt: skip
        ended = [c for c in children if c.pid in verdicts and not verdicts[c.pid].keep]
        if not ended:
            return
        termed, killed = proctree.terminate(ended, LEFTOVER_GRACE_S)
        why: dict[str, list[str]] = {}
        for proc in ended:
            why.setdefault(verdicts[proc.pid].why, []).append(str(proc.pid))
        self.log.warning(
            "Trial #%d left %d process(es) running: sent SIGTERM to %d, SIGKILL to %d (pids %s)",
            number,
            len(ended),
            termed,
            killed,
            "; ".join(f"{','.join(pids)}: {reason}" for reason, pids in why.items()),
        )

    def _attach_evidence(self, trial: optuna.trial.Trial, evidence: _Evidence) -> None:
        """The trial's memory timeline and its log lines, as artifacts of the trial
        (``optguard.evidence``). Best effort: only a storage error propagates (as from any
        write); a trial reaped meanwhile is left to the tell that follows."""
        from optguard.evidence import store_evidence, trial_log_lines

        points = read_spool(spool_path(self.log_path), trial._trial_id, evidence.started)
        points = sorted(points + evidence.samples())
        if not points and evidence.peak:
            points = [(evidence.duration, evidence.peak)]  # nothing sampled: the peak, at the end
        lines = trial_log_lines(self.log_path, trial.number, self.log_offset)
        try:
            why = store_evidence(
                self.artifact_dir,  # type: ignore[arg-type]
                None, trial, points, self.opts.limits, lines, self.log,
            )  # fmt: skip
        except UpdateFinishedTrialError:
            return  # reaped by another host meanwhile: _finish's tell says so
        if why is not None:
            self.log.warning("Trial #%d: evidence not stored: %s", trial.number, error_line(why))

    def set_attrs(
        self, trial: optuna.trial.Trial, attrs: dict[str, Any], closing: bool = False
    ) -> None:
        """``optguard.``-prefixed user attributes, all in one storage transaction (with
        ``closing``, the one of the ``study.tell`` that follows); the objective sees them in
        ``trial.user_attrs`` as after ``set_user_attr``."""
        prefixed = {ATTR_PREFIX + k: v for k, v in attrs.items()}
        write = set_closing_attrs if closing else set_trial_user_attrs
        try:
            write(self.storage, trial._trial_id, prefixed)
        except UpdateFinishedTrialError:
            return  # reaped by another host meanwhile: _finish's tell says so and goes on
        trial._cached_frozen_trial.user_attrs.update(prefixed)

    def _finish(
        self,
        trial: optuna.trial.Trial,
        state: TrialState,
        value: float | list[float] | None,
        attrs: dict[str, Any],
        evidence: _Evidence | None = None,
    ) -> None:
        """Clean up, record the final memory, attach the ``evidence`` (when not ``None``: see
        ``_attach_evidence``), then tell: a finished trial is read-only."""
        report = release_memory()
        self.last_final_rss = report.rss_after
        in_mb = {
            key.replace("_rss_bytes", "_mb"): round(value / 1e6, 1)
            for key, value in {**attrs, "final_rss_bytes": report.rss_after}.items()
            if key.endswith("_rss_bytes")
        }  # peak_mb, final_mb: read as they are in optuna-dashboard
        self.set_attrs(
            trial, {**attrs, "final_rss_bytes": report.rss_after, **in_mb}, closing=True
        )
        self.log.info(
            "Trial #%d final memory: %s%s (freed %.1fMB in %.1fms, gc collected %d objects)",
            trial.number,
            format_gb(report.rss_after, 2),
            "" if report.gpu_after is None else f", GPU {format_gb(report.gpu_after, 2)}",
            report.freed_bytes / 1e6,
            report.seconds * 1000,
            report.collected,
        )
        if evidence is not None:
            self._attach_evidence(trial, evidence)
        try:
            _tell(self.study, trial, value if state == TrialState.COMPLETE else None, state)
        except (UpdateFinishedTrialError, ValueError) as exc:
            if self.storage.get_trial(trial._trial_id).state.is_finished():
                # Reaped meanwhile (its host looked dead to another: a heartbeat missed during
                # an outage); Optuna refuses to tell a finished trial. It stays as that host
                # recorded it, and this worker goes on.
                self.log.warning("Trial #%d was already finished by another host", trial.number)
                getattr(self.storage, "closing_attrs", {}).pop(trial._trial_id, None)
                return
            if not isinstance(exc, ValueError):
                raise
            # a value Optuna refuses: the trial fails, the worker goes on
            self.log.error("Trial #%d failed: %s", trial.number, error_line(exc))
            self.set_attrs(trial, {"error": error_line(exc)})
            _tell(self.study, trial, None, TrialState.FAIL)


def _tell(
    study: optuna.Study,
    trial: optuna.trial.Trial,
    value: float | list[float] | None,
    state: TrialState,
) -> None:
    """``study.tell`` as ``study.optimize`` does it: without ``tell``'s final re-read and
    copy of the trial, a storage transaction per trial that nobody here uses."""
    _tell_with_warning(
        study=study,
        trial=trial,
        value_or_values=value,
        state=None if state == TrialState.COMPLETE else state,
    )


def _open_study(
    opts: RunOptions, url: str, gateway: Any | None = None
) -> tuple[optuna.Study, TrialSlots | GatewaySlots]:
    """The study, created with ``opts.directions`` when new; an existing one's directions are
    kept, and others given are refused (``study.resolve_directions``), as is a
    single-objective sampler for a multi-objective study (``study.sampler_error``).
    ``gateway``: the storage through the supervisor (``optguard.gateway``), else ``url``'s."""
    from optuna.storages._cached_storage import _CachedStorage

    from optguard.errors import UsageError
    from optguard.study import sampler_error

    storage = gateway or open_storage(url, queue_writes=True, outage_s=opts.storage_outage_s)
    directions = resolve_directions(
        opts.directions, stored_directions(storage, opts.study), opts.study
    )
    refused = sampler_error(opts.sampler, len(directions))  # else every trial fails
    if refused is not None:
        raise UsageError(f"study {opts.study!r}: {refused}")
    study = optuna.create_study(
        study_name=opts.study,
        # as Optuna caches an RDB storage: the sampler reads only what changed
        storage=storage if gateway is None else _CachedStorage(gateway),
        directions=list(directions),
        sampler=make_sampler(opts.sampler),
        pruner=make_pruner(opts.pruner),
        load_if_exists=True,
    )
    resolve_directions(directions, direction_names(study.directions), opts.study)  # a race
    if gateway is not None:
        return study, GatewaySlots(gateway, opts.study)
    return study, TrialSlots(storage, opts.study)


def _seed_sampler(
    study: optuna.Study, slots: TrialSlots | GatewaySlots, opts: RunOptions, index: int
) -> str:
    """``--seed``: this worker's sampler seeded by ``study.worker_seed``; what it got, for
    the log (empty without ``--seed``)."""
    if opts.seed is None:
        return ""
    before = slots.count_trials()
    seed = worker_seed(opts.seed, index, before)
    study.sampler = make_sampler(opts.sampler, seed)
    return (
        f"Sampler {opts.sampler} seeded with {seed} (--seed {opts.seed}, worker {index}, "
        f"{before} trial(s) in the study)"
    )


def _recycle_reason(opts: RunOptions, ran: int, final_rss: int) -> str | None:
    """Why this worker should be replaced before its next trial, if it should.

    Memory that cleanup could not return and that is already at the trial limit would prune
    every later trial of this worker at once, whatever its parameters (hiding the guilty one
    from the report), so such a worker is always replaced.
    """
    limit = opts.limits.max_rss_bytes
    if limit is not None and final_rss >= limit:
        shown, shown_limit = format_against(final_rss, limit, "size")
        return (
            f"memory after cleanup {shown} >= --max-rss {shown_limit} "
            "(a leak cleanup cannot return)"
        )
    if opts.max_trials_per_worker is not None and ran >= opts.max_trials_per_worker:
        return f"{ran} trials (--max-trials-per-worker {opts.max_trials_per_worker})"
    if opts.recycle_rss is not None and final_rss > opts.recycle_rss:
        shown, shown_limit = format_against(final_rss, opts.recycle_rss, "size")
        return f"memory after cleanup {shown} > --recycle-rss {shown_limit}"
    return None


def run_worker(opts: RunOptions, index: int = 0) -> int:
    """Run trials until the study has ``n_trials`` or a stop signal; return the exit code.

    ``EXIT_RECYCLE`` asks the supervisor for a fresh worker (``--max-trials-per-worker``,
    ``--recycle-rss``): the remedy for leaks that gc and ``malloc_trim`` cannot reclaim.
    """
    identity = WorkerIdentity.current(index)
    log = worker_logger(
        worker_log_path(opts.log_dir, opts.study, identity.host, index), identity.label
    )
    optuna_logger = logging.getLogger("optuna")
    optuna_logger.setLevel(logging.WARNING)
    optuna_logger.propagate = False
    # "unreachable ... retrying"; a checkpoint store without the series' files
    ours = [logging.getLogger(name) for name in ("optguard.outage", "optguard.checkpoints")]
    for logger in ours:
        logger.propagate = False
    for handler in log.handlers:
        optuna_logger.addHandler(handler)  # Optuna's own warnings land in the same file
        for logger in ours:
            logger.addHandler(handler)
    optuna.logging.disable_default_handler()
    supervised = _Supervised()
    supervised.install()
    piped = channel.take_storage_url()  # and OPTGUARD_STORAGE: no trial's child inherits it
    gateway = take_gateway()  # the supervisor's connection, on a database server
    url = resolve_url(opts.storage or piped)
    limits = opts.limits
    log.info(
        "Worker started: study=%s storage=%s host=%s timeout=%ss max_rss=%s %s%s",
        opts.study,
        mask_url(url),
        identity.host,
        limits.timeout_s,
        "-" if limits.max_rss_bytes is None else format_against(
            limits.max_rss_bytes, limits.max_rss_bytes, "size"
        )[1],
        worker_summary(os.environ, available_cpus()),
        gpus.worker_summary(os.environ, limits),
    )
    unwatched = gpus.unwatched_warning(limits, gpus.nvml_unavailable())
    if unwatched is not None:
        log.warning("%s", unwatched[len("warning: "):])
    try:
        check_sampler(opts.sampler)  # a worker started by hand or a scheduler: no preflight
        objective = load_objective(opts.objective)
        if piped is not None:
            # The supervisor opened this storage already: an error now is an outage (a
            # replacement started while the server restarts), ridden out like any other.
            study, slots = Outage(url, opts.storage_outage_s).call(
                lambda: _open_study(opts, url, gateway)
            )
        else:
            study, slots = _open_study(opts, url, gateway)
        seeded = _seed_sampler(study, slots, opts, index)
    except OptguardError as exc:
        log.error("%s %s", START_FAILURE, exc)
        raise
    if seeded:
        log.info(seeded)
    # Everything loaded so far (optuna, the objective's modules and data) lives as long as the
    # worker: freezing it keeps the post-trial gc passes from rescanning it after every trial.
    gc.freeze()
    runner = _TrialRunner(study, slots.storage, objective, opts, identity, log, supervised, url)
    supervised.ready = True
    supervised.report("ready")
    ran = 0
    code = 0
    started = time.monotonic()
    polled = -math.inf
    try:
        while supervised.stop_reason is None:
            if time.monotonic() - polled >= CONTROL_POLL_S:
                polled = time.monotonic()
                requested = read_request(slots.storage, slots.study_id)
                if requested is not None:
                    supervised.stop_reason = f"optguard {requested}"
                    break
            trial = slots.claim(study, opts.n_trials, runner.owner_attrs())
            if trial is None:
                log.info("Study %s has its %s trials", opts.study, opts.n_trials)
                break
            runner.run(trial)
            ran += 1
            recycle = _recycle_reason(opts, ran, runner.last_final_rss)
            if recycle is not None and supervised.stop_reason is None:
                log.info("Recycling worker after %s", recycle)
                code = EXIT_RECYCLE
                break
    except StorageError as exc:
        log.error("Storage error: %s", exc)
        supervised.report("storage_error", message=str(exc))  # the pipe works on a full disk
        raise
    finally:
        slots.close()
    # Nothing left to record: a SIGTERM (the supervisor ending a worker that lingers in a
    # non-daemon thread or an atexit handler) now ends it at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    supervised.report("exiting", why=supervised.stop_reason or "done")
    log.info(
        "Worker exiting: %d trials in %.1fs%s",
        ran,
        time.monotonic() - started,
        f" (stopped: {supervised.stop_reason})" if supervised.stop_reason else "",
    )
    return code
