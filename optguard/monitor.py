"""``optguard monitor``: sample this host's memory until stopped, one JSON line per sample.

A sample holds system RAM, swap, each GPU's memory and each optguard worker of this host
(the RSS of its whole process tree and, with a study, the trial it runs). Threshold crossings
are warned about once per crossing, not once per sample. optuna is imported only when a study
is given, so the monitor stays light on the machine it watches.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Self

import psutil

from optguard.errors import OptguardError, UsageError
from optguard.monitor_gpu import GpuProbe
from optguard.proctree import children_map, rss_of, tree_pids

__all__ = [
    "MonitorOptions",
    "MonitorResult",
    "ThresholdWatch",
    "Thresholds",
    "WorkerWatch",
    "default_log_path",
    "find_workers",
    "run_monitor",
    "sample",
]

WORKER_ATTR = "optguard.worker"  # "host:pid" on every trial a worker runs
_SLICE_S = 0.1  # how often the sleep between samples looks at the stop flag


@dataclass(frozen=True)
class Thresholds:
    """Percents at or above which a warning is given (the field notes' defaults)."""

    ram: float = 85.0
    gpu: float = 90.0
    swap: float = 50.0


def default_log_path(host: str | None = None) -> Path:
    return Path("logs") / f"memory_{host or socket.gethostname()}.jsonl"


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


class ThresholdWatch:
    """One warning per crossing: a series warns when it reaches its threshold and re-arms
    only after it drops back below, so a machine sitting at 90% does not flood the log."""

    def __init__(self, thresholds: Thresholds) -> None:
        self.thresholds = thresholds
        self._above: set[str] = set()

    def check(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        """The warning events (JSON-ready) of this sample's new crossings."""
        events = []
        for series, label, value, limit in _series(data, self.thresholds):
            if value < limit:
                self._above.discard(series)
                continue
            if series in self._above:
                continue
            self._above.add(series)
            events.append({
                "event": "warning", "timestamp": data.get("timestamp") or _now(),
                "series": series, "percent": value, "threshold": limit,
                "message": f"{label} at {value:.1f}% (threshold {limit:g}%)",
            })  # fmt: skip
        return events


def _series(data: dict[str, Any], th: Thresholds) -> Iterator[tuple[str, str, float, float]]:
    yield "ram", "RAM", float(data["ram"]["percent"]), th.ram
    yield "swap", "swap", float(data["swap"]["percent"]), th.swap
    for gpu in data.get("gpus", []):
        yield f"gpu{gpu['index']}", f"GPU {gpu['index']} memory", float(gpu["percent"]), th.gpu


def _is_worker(cmdline: list[str]) -> bool:
    """``python -m optguard worker ...`` or ``.../optguard worker ...`` (root options allowed)."""
    for i, arg in enumerate(cmdline[:6]):  # python [-X dev ...] -m optguard
        module = arg == "optguard" and i > 0 and cmdline[i - 1] == "-m"
        script = i <= 1 and os.path.basename(arg) == "optguard"
        if module or script:
            rest = [a for a in cmdline[i + 1 :] if not a.startswith("-")]
            return bool(rest) and rest[0] == "worker"
    return False


def _option(cmdline: list[str], name: str) -> str | None:
    for i, arg in enumerate(cmdline):
        if arg == name and i + 1 < len(cmdline):
            return cmdline[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def find_workers() -> list[tuple[int, str | None]]:
    """``(pid, study)`` of the optguard workers of this host, found by their command line."""
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if proc.info["pid"] != me and _is_worker(cmdline):
            found.append((proc.info["pid"], _option(cmdline, "--study")))
    return sorted(found)


class WorkerWatch:
    """The workers of this host and, when a study is given, the trial each one runs."""

    def __init__(self, study: str | None = None, storage: str | None = None) -> None:
        self.host = socket.gethostname()
        self.study = study
        self.url: str | None = None
        self.notice: str | None = None  # set once when the storage starts failing
        self._failing = False
        self._storage: Any = None
        self._study_id: int | None = None
        if study is not None:
            from optguard.storage import open_existing_study

            self.url, self._storage, self._study_id = open_existing_study(study, storage)

    def _trials(self) -> dict[str, int]:
        """``host:pid`` -> number of the RUNNING trials of the study."""
        if self._storage is None:
            return {}
        from optuna.exceptions import StorageInternalError
        from optuna.trial import TrialState
        from sqlalchemy.exc import SQLAlchemyError

        try:
            trials = self._storage.get_all_trials(
                self._study_id, deepcopy=False, states=(TrialState.RUNNING,)
            )
        except (StorageInternalError, SQLAlchemyError) as exc:
            # the storage is down for a while: the sample still has memory, trials unknown
            if not self._failing:
                self.notice = f"trials unknown while the storage fails ({type(exc).__name__})"
            self._failing = True
            return {}
        self._failing = False
        return {str(t.user_attrs.get(WORKER_ATTR)): t.number for t in trials}

    def read(self) -> list[dict[str, Any]]:
        """One entry per worker: ``pid``, ``study``, ``rss_bytes`` (whole tree), ``processes``,
        ``trial`` (null when unknown)."""
        trials = self._trials()
        workers = []
        kids = children_map()  # one listing of /proc for every worker's tree
        for pid, study in find_workers():
            pids = tree_pids(pid, kids)
            if not pids:
                continue  # exited since it was listed
            workers.append({
                "pid": pid, "study": study, "rss_bytes": rss_of(pids), "processes": len(pids),
                "trial": trials.get(f"{self.host}:{pid}"),
            })  # fmt: skip
        return workers

    def close(self) -> None:
        if self._storage is not None:
            from optguard.storage import is_rdb

            if is_rdb(self._storage):  # the journal file holds no connection
                self._storage.remove_session()
                self._storage.engine.dispose()
            self._storage = None


def sample(gpus: GpuProbe | None = None, workers: WorkerWatch | None = None) -> dict[str, Any]:
    """One JSON-ready sample of this host: ``timestamp``, ``host``, ``ram``, ``swap``,
    ``gpus``, ``workers`` (the last two empty lists without a probe or watch)."""
    ram = psutil.virtual_memory()
    swap = psutil.swap_memory()
    return {
        "timestamp": _now(),
        "host": socket.gethostname(),
        "ram": {"total_bytes": ram.total, "used_bytes": ram.total - ram.available,
                "percent": round(ram.percent, 1)},
        "swap": {"used_bytes": swap.used, "percent": round(swap.percent, 1)},
        "gpus": gpus.read() if gpus is not None else [],
        "workers": workers.read() if workers is not None else [],
    }  # fmt: skip


@dataclass(frozen=True)
class MonitorOptions:
    interval_s: float = 30.0
    log_path: Path | None = field(default_factory=default_log_path)  # None: no log
    thresholds: Thresholds = field(default_factory=Thresholds)
    study: str | None = None
    storage: str | None = None
    max_samples: int | None = None  # None: until SIGINT or SIGTERM


@dataclass
class MonitorResult:
    samples: int = 0
    warnings: int = 0
    log_path: Path | None = None


class _StopFlag:
    """Set by SIGINT/SIGTERM; the handler only sets it, the loop notices between samples."""

    def __init__(self) -> None:
        self.set = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, _signum: int, _frame: Any) -> None:
        self.set = True

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.set and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(_SLICE_S, left))


def run_monitor(
    opts: MonitorOptions,
    on_sample: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> MonitorResult:
    """Sample every ``interval_s`` until SIGINT/SIGTERM (or ``max_samples``), appending each
    sample and each warning event to the JSONL log as one complete, flushed line."""
    notice = on_notice or (lambda _text: None)
    result = MonitorResult(log_path=opts.log_path)
    watch = ThresholdWatch(opts.thresholds)
    with contextlib.ExitStack() as stack:
        log = None if opts.log_path is None else stack.enter_context(_open_log(opts.log_path))
        workers = WorkerWatch(opts.study, opts.storage)
        stack.callback(workers.close)
        gpus = GpuProbe()
        stack.callback(gpus.close)
        if gpus.notice:
            notice(gpus.notice)
        stop = stack.enter_context(_StopFlag())
        while not stop.set:
            data = sample(gpus, workers)
            warnings = watch.check(data)
            if workers.notice:
                notice(workers.notice)
                workers.notice = None
            if log is not None:
                _write(log, [data, *warnings])
            result.samples += 1
            result.warnings += len(warnings)
            if on_sample is not None:
                on_sample(data, warnings)
            if opts.max_samples is not None and result.samples >= opts.max_samples:
                break
            stop.sleep(opts.interval_s)
    return result


def _open_log(path: Path) -> IO[str]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("a", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--log: cannot write {path}: {exc.strerror or exc}") from None


def _write(log: IO[str], events: list[dict[str, Any]]) -> None:
    """One write and a flush per sample, so a reader never sees half a line unless the
    machine dies mid-write (``--analyze`` skips such a line)."""
    try:
        log.write("".join(json.dumps(e) + "\n" for e in events))
        log.flush()
    except OSError as exc:  # disk full, NFS gone: stop with one line, not a traceback
        raise OptguardError(f"cannot write {log.name}: {exc.strerror or exc}") from None
