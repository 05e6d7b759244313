"""The worker processes a supervisor starts: their command line, pipes, and what it knows of
each (ready, the trial it runs, whether optguard is ending it).

Each worker leads its own session, so the terminal's Ctrl+C reaches only the supervisor and a
worker's process group can be signalled without touching anything optguard did not start.
The storage URL reaches a worker through a pipe it reads once, never argv (``ps``) or the
environment (inherited by every process a trial starts); on a database server, its storage
calls go through a socket pair to the supervisor's gateway (``optguard.gateway``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from optguard import channel, gpus, proctree, threads
from optguard.config import RunOptions
from optguard.gateway.protocol import FD_ENV as GATEWAY_FD_ENV
from optguard.guard import Violation
from optguard.logs import worker_log_path, worker_logger
from optguard.supervision.escalation import Watched

if TYPE_CHECKING:
    from optguard.gateway.server import Gateway, Served

__all__ = ["Worker", "spawn_worker"]

GATEWAY_JOIN_S = 10.0  # a call that takes longer (an outage) is judged without waiting


@dataclass
class Worker:
    index: int
    uid: str  # index.spawn: inherited by descendants as OPTGUARD_WORKER
    proc: subprocess.Popen[bytes]
    log: logging.Logger
    log_path: Path
    out: IO[bytes]
    status: channel.LineReader
    control_fd: int
    spawned_at: float
    ready: bool = False
    trial: Watched | None = None
    pids: list[int] = field(default_factory=list)
    memory: int = 0
    kill: Violation | None = None  # the kill step for its trial
    kill_at: float = 0.0
    kill_escalated: bool = False
    kill_now: bool = False  # memory above the ceiling: no wait for emergency checkpoints
    checkpoint_until: float = 0.0  # running emergency checkpoint callbacks until then
    exiting_at: float | None = None  # it said it leaves after its last trial
    ending: str | None = None  # why optguard ends it (not for a trial): stop, cancel, ...
    ending_at: float = 0.0
    sent: str | None = None  # optguard's own SIGKILL, in words, for the exit description
    exit_why: str = "done"  # why it left after its last trial (its stop reason)
    storage_error: str | None = None  # why it gave up on the storage (past --storage-outage)
    served: Served | None = None  # its gateway thread (optguard.gateway)

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

    def sigkill_tree(self, why: str) -> int:
        """Freeze the tree, read its peak memory, SIGKILL it; returns the peak."""
        self.sent = self.sent or f"SIGKILL: {why}"
        peak = proctree.freeze_peak(self.proc.pid, [self.proc.pid, *self.pids])
        self.signal_tree(signal.SIGKILL)
        return peak

    def close(self, judged: bool = True) -> None:
        """Release its pipes; with ``judged`` (its trial is to be recorded next), wait first
        for the storage call it left under way. Without: the storage is gone for good and
        nothing is recorded, so N workers' calls stuck in the outage cost no N waits."""
        self.out.close()
        os.close(self.control_fd)
        os.close(self.status.fd)
        if judged and self.served is not None:
            # The call it had under way still runs in the gateway (a tell, say): let it end
            # before its trial is judged, as its own connection's would have when it died.
            self.served.join(GATEWAY_JOIN_S)

    def claiming(self) -> bool:
        """Whether the gateway runs a claim for it. A dead worker is judged only after: the
        claim may wait long for the study-wide lock, and the trial it makes for a worker
        that is gone is given back, not judged (a judge reading it RUNNING meanwhile could
        record the trial another worker claims next)."""
        return self.served is not None and self.served.is_alive() and self.served.call == "claim"


def worker_argv(opts: RunOptions, index: int) -> list[str]:
    argv = [
        sys.executable, "-m", "optguard", "worker",
        "--study", opts.study,
        "--objective", opts.objective,
        "--index", str(index),
        *(arg for d in opts.directions for arg in ("--direction", d)),
        "--sampler", opts.sampler,
        "--pruner", opts.pruner,
        "--log-dir", str(opts.log_dir),
        "--checkpoint-dir", str(opts.checkpoint_dir),
        "--checkpoint-budget", repr(opts.checkpoint_budget_s),
        "--checkpoint-store", opts.checkpoint_store,
        *(("--artifacts", opts.artifacts) if opts.artifacts is not None else ()),
        *(("--artifacts-all",) if opts.artifacts_all else ()),
        "--storage-outage", repr(opts.storage_outage_s),
    ]  # fmt: skip
    optional = {
        "--n-trials": opts.n_trials,
        "--timeout": opts.limits.timeout_s,
        "--max-rss": opts.limits.max_rss_bytes,
        "--max-trials-per-worker": opts.max_trials_per_worker,
        "--recycle-rss": opts.recycle_rss,
        "--seed": opts.seed,
    }
    if opts.tag is not None:
        argv += ["--tag", opts.tag]
    if not opts.keep_pools:
        argv.append("--no-keep-pools")
    if opts.limits.max_vram_percent is not None:  # NVML could not tell the GPUs' memory
        argv += ["--max-vram", f"{opts.limits.max_vram_percent!r}%"]
    elif opts.limits.max_vram_bytes is not None:
        argv += ["--max-vram", repr(opts.limits.max_vram_bytes)]
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, repr(value)]
    return argv


def _url_pipe(url: str) -> int:
    """A pipe holding the URL, closed for writing: the worker reads it to EOF once."""
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, url.encode())  # far below the pipe's buffer: never blocks
    finally:
        os.close(write_fd)
    return read_fd


def spawn_worker(
    opts: RunOptions,
    index: int,
    uid: str,
    url: str,
    run_id: str,
    now: float,
    gateway: Gateway | None = None,
) -> Worker:
    """Start worker ``index`` (a replacement keeps the index, so the same log file), served
    by ``gateway`` if the run has one (``optguard.gateway``)."""
    host = socket.gethostname()
    log_path = worker_log_path(opts.log_dir, opts.study, host, index)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = log_path.with_suffix(".out").open("ab")
    status_r, status_w, control_r, control_w = channel.open_pipe_pair()
    url_r = _url_pipe(url)
    theirs, served = (None, None) if gateway is None else gateway.connect(f"w{index}.{uid}")
    fds = (status_w, control_r, url_r) + (() if theirs is None else (theirs.fileno(),))
    env = {k: v for k, v in os.environ.items() if k != channel.STORAGE_ENV}
    # Thread pools are sized when their library loads (optuna loads NumPy before the
    # objective): the environment is the one place early enough. The user's values win.
    plan = threads.plan_threads(
        opts.threads_per_worker, opts.workers, opts.cpu_affinity, os.environ, threads.run_cpus()
    )
    env.update(plan.export)
    # CUDA reads CUDA_VISIBLE_DEVICES at its first call: the environment is early enough, and
    # a replacement (same index) gets the GPUs of the worker it replaces.
    groups = gpus.run_groups(opts.gpus, opts.gpus_per_worker)
    env.update(gpus.gpu_env(gpus.assign_devices(groups, index), os.environ))
    env.update({
        channel.STORAGE_FD_ENV: str(url_r),
        channel.STATUS_FD_ENV: str(status_w),
        channel.CONTROL_FD_ENV: str(control_r),
        channel.WORKER_ENV: uid,
        channel.SUPERVISOR_ENV: str(os.getpid()),
        channel.RUN_ENV: run_id,
    })  # fmt: skip
    if theirs is not None:
        env[GATEWAY_FD_ENV] = str(theirs.fileno())
    try:
        # Pinned from its first instruction: it inherits this thread's mask (threads.py).
        with threads.spawn_affinity(plan.cpus_of(index)):
            proc = subprocess.Popen(
                worker_argv(opts, index),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                pass_fds=fds,
            )
    finally:
        for fd in (status_w, control_r, url_r):
            os.close(fd)
        if theirs is not None:
            theirs.close()  # the worker's now: its exit ends the serving thread
    wlog = worker_logger(
        log_path, f"{index}:{proc.pid}", name=f"optguard.supervisor.w{index}", trial="-"
    )
    return Worker(
        index, uid, proc, wlog, log_path, out, channel.LineReader(status_r), control_w, now,
        served=served,
    )
