"""Threads per worker: N workers on C cores must not each start C threads.

PyTorch, LightGBM and NumPy's BLAS size their thread pools to every core they see, so N
workers oversubscribe the machine N times (PyTorch's example: 80 s under 2 workers on 2 cores,
15.6 s with ``OMP_NUM_THREADS=1``). Those libraries read their variables once, when loaded,
so the supervisor puts them in each worker's environment before the worker starts: optuna
loads NumPy long before the objective is imported. A variable the user set wins.

Pinning (``--cpu-affinity``) gives worker i its own slice of the cores. The worker inherits
the mask from the thread that starts it (``fork`` copies the calling thread's affinity), so
the spawning thread takes the worker's mask just around ``Popen``: the worker and every
thread and process it starts are pinned from their first instruction. Setting it on the pid
after ``Popen`` would miss threads started before (OpenBLAS starts its pool at import), and
``preexec_fn`` is unsafe in a threaded supervisor.

Everything here but ``available_cpus`` and ``spawn_affinity`` is pure, for table tests.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

__all__ = [
    "THREAD_VARS",
    "THREADS_ENV",
    "ThreadPlan",
    "available_cpus",
    "default_threads",
    "format_cpus",
    "plan_threads",
    "run_cpus",
    "split_cpus",
    "spawn_affinity",
    "thread_env",
    "worker_summary",
]

# Read at load by OpenMP (PyTorch, LightGBM, scikit-learn), MKL, OpenBLAS, numexpr, Apple's
# Accelerate and BLIS. OMP_NUM_THREADS is the one torch reads for its intra-op threads.
# LOKY_MAX_CPU_COUNT is the core count joblib reports, so scikit-learn's n_jobs=-1 means the
# worker's share too (with one thread, no process pool at all: the work runs in the worker).
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "BLIS_NUM_THREADS",
    "LOKY_MAX_CPU_COUNT",
)
THREADS_ENV = "OPTGUARD_THREADS"  # optguard's choice, so a worker can tell it from the user's


def available_cpus() -> tuple[int, ...]:
    """The cores this process may run on (its affinity, as under ``taskset`` or a cgroup)."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS): every core
        return tuple(range(os.cpu_count() or 1))


@functools.cache
def run_cpus() -> tuple[int, ...]:
    """``available_cpus()`` when first asked: the run's cores, whatever ``spawn_affinity``
    does to the spawning thread's mask afterwards."""
    return available_cpus()


def default_threads(n_cpus: int, workers: int) -> int:
    """The cores shared out among the workers, at least one thread each."""
    return max(1, n_cpus // max(1, workers))


def thread_env(threads: int, environ: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """``(to export, kept)``: each variable set to ``threads`` unless the user set it.

    A non-empty value in ``environ`` is the user's choice and is kept; an empty one is what
    the libraries ignore too, so it is replaced.
    """
    export: dict[str, str] = {}
    kept: dict[str, str] = {}
    for var in THREAD_VARS:
        value = environ.get(var, "").strip()
        if value:
            kept[var] = value
        else:
            export[var] = str(threads)
    export[THREADS_ENV] = str(threads)
    return export, kept


def split_cpus(cpus: Sequence[int], index: int, per_worker: int) -> tuple[int, ...]:
    """Worker ``index``'s cores: ``[index*k, (index+1)*k)`` of the sorted ``cpus``, wrapping
    round when the workers need more cores than there are (never more than all of them)."""
    ordered = sorted(cpus)
    if not ordered:
        return ()
    k = min(per_worker, len(ordered))
    start = index * per_worker
    return tuple(sorted({ordered[(start + j) % len(ordered)] for j in range(k)}))


def format_cpus(cpus: Sequence[int]) -> str:
    """``0-3,6``: the list ``taskset -c`` takes."""
    parts: list[str] = []
    ordered = sorted(set(cpus))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True)
class ThreadPlan:
    """What every worker of a run gets: its threads, its environment, its cores if pinned."""

    threads: int
    cpus: tuple[int, ...]  # available to the supervisor
    pinned: bool
    export: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)  # the user's own values

    def cpus_of(self, index: int) -> tuple[int, ...] | None:
        """Worker ``index``'s cores; ``None`` when not pinned (it inherits the run's)."""
        return split_cpus(self.cpus, index, self.threads) if self.pinned else None

    def describe(self) -> str:
        """``1 thread(s) per worker (OMP_NUM_THREADS=4 from the environment), cpus 0-1``."""
        text = f"{self.threads} thread(s) per worker"
        if self.kept:
            kept = ", ".join(f"{k}={v}" for k, v in self.kept.items())
            text += f" ({kept} from the environment)"
        if self.pinned:
            text += f", cpus {format_cpus(self.cpus)} pinned"
        return text


def plan_threads(
    threads_per_worker: int | None,
    workers: int,
    pinned: bool,
    environ: Mapping[str, str],
    cpus: Sequence[int],
) -> ThreadPlan:
    """The plan for a run: ``threads_per_worker`` or, when ``None``, the default."""
    threads = threads_per_worker or default_threads(len(cpus), workers)
    export, kept = thread_env(threads, environ)
    return ThreadPlan(threads, tuple(sorted(cpus)), pinned, export, kept)


@contextlib.contextmanager
def spawn_affinity(cpus: Sequence[int] | None) -> Iterator[None]:
    """Run the block on ``cpus`` (this thread only), so a process it starts inherits them."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def worker_summary(environ: Mapping[str, str], cpus: Sequence[int]) -> str:
    """For a worker's "Worker started:" line: ``threads=1 cpus=0`` and the user's overrides."""
    chosen = environ.get(THREADS_ENV)
    text = f"threads={chosen or environ.get('OMP_NUM_THREADS') or 'unset'}"
    if chosen:
        own = [f"{v}={environ[v]}" for v in THREAD_VARS if environ.get(v, chosen) != chosen]
        if own:
            text += f" ({', '.join(own)} from the environment)"
    return f"{text} cpus={format_cpus(cpus)}"
