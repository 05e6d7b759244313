"""The cooperative guard: limits checked before every split of a trial.

A plain objective is guarded without changes: the worker wraps the trial's ``report`` and
``should_prune`` so every call checks the limits first. ``check(trial)`` and
``splits(trial, iterable)`` add checks where an objective has no report to make.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, TypeVar

import optuna

from optguard import gpus
from optguard.limits import Limits, format_against, format_gb
from optguard.memory import current_rss

__all__ = ["GuardPruned", "TrialGuard", "Violation", "check", "splits"]

T = TypeVar("T")

REASON_TIMEOUT = "timeout"
REASON_MEMORY = "memory"
REASON_SYSTEM_MEMORY = "system_memory"
MEMORY_REASONS = (REASON_MEMORY, REASON_SYSTEM_MEMORY)
REASON_GPU_MEMORY = gpus.REASON_GPU_MEMORY  # rss_bytes then holds the trial's GPU memory
ENFORCEMENT_OOM = "oom"  # the objective raised an out-of-memory error (MemoryError, CUDA's)


@dataclass(frozen=True)
class Violation:
    """A limit a trial crossed, with what was measured when it did."""

    trial_number: int
    reason: str
    elapsed_s: float
    rss_bytes: int
    limit: float
    enforcement: str = "check"  # check, interrupt or hard_kill: which step ended the trial

    def limit_in_unit(self) -> dict[str, float]:
        """The limit under a name that says its unit, for the trial's attributes:
        ``limit_s`` for a time limit, ``limit_bytes`` for a memory one, else nothing."""
        if self.reason == REASON_TIMEOUT:
            return {"limit_s": self.limit}
        if self.reason in MEMORY_REASONS:
            return {"limit_bytes": self.limit}
        if self.reason == REASON_GPU_MEMORY:  # and what was measured, under its own name
            return {"limit_bytes": self.limit, "vram_bytes": self.rss_bytes}
        return {}

    def _pair(self) -> tuple[str, str]:
        """The measured value and the limit, in one unit, printed so they differ if they do."""
        if self.reason == REASON_TIMEOUT:
            return format_against(self.elapsed_s, self.limit, "duration")
        return format_against(self.rss_bytes, self.limit, "size")

    @property
    def phrase(self) -> str:
        """The words users grep for: ``Trial timeout: 31.2min``, ``Memory limit exceeded:
        12.1GB``."""
        if self.reason == REASON_TIMEOUT:
            return f"Trial timeout: {self._pair()[0]}"
        if self.enforcement == ENFORCEMENT_OOM:
            scope = "GPU memory" if self.reason == REASON_GPU_MEMORY else "Memory"
            return f"{scope} exhausted: the objective ran out of memory"
        if self.reason in MEMORY_REASONS:
            return f"Memory limit exceeded: {self._pair()[0]}"
        if self.reason == REASON_GPU_MEMORY:
            return f"GPU memory limit exceeded: {self._pair()[0]}"
        return f"Trial stopped: {self.reason}"

    @property
    def detail(self) -> str:
        """``limit 30min`` (``system RAM 14.4GB`` for the machine's threshold), in the unit
        and precision of the phrase's value."""
        if self.reason == REASON_TIMEOUT:
            return f"limit {self._pair()[1]}"
        if self.enforcement == ENFORCEMENT_OOM:
            what = "GPU memory" if self.reason == REASON_GPU_MEMORY else "memory"
            if self.limit > 0:  # and the limit it was under
                return f"{what} {' against limit '.join(self._pair())}"
            return f"{what} {format_gb(self.rss_bytes, 2)}"
        if self.reason in MEMORY_REASONS or self.reason == REASON_GPU_MEMORY:
            scope = "system RAM" if self.reason == REASON_SYSTEM_MEMORY else "limit"
            return f"{scope} {self._pair()[1]}"
        return f"elapsed {self.elapsed_s:.1f}s"

    def log_line(self) -> str:
        return f"Trial #{self.trial_number} pruned: {self.phrase} ({self.detail})"


class GuardPruned(optuna.TrialPruned):
    """``optuna.TrialPruned`` raised by the guard, carrying the violation."""

    def __init__(self, violation: Violation) -> None:
        super().__init__(violation.phrase)
        self.violation = violation


class TrialGuard:
    """Limits of one running trial; ``check`` raises ``GuardPruned`` once one is crossed."""

    def __init__(self, trial: optuna.trial.Trial, limits: Limits) -> None:
        self.trial = trial
        self.number = trial.number
        self.limits = limits
        self.started = time.monotonic()
        self.peak_rss = 0
        self.peak_vram = 0
        self._vram_limit: int | None = limits.max_vram_bytes  # a percent: once GPUs are known
        self._stop: Violation | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def request_stop(self, violation: Violation) -> None:
        """Make the next check prune the trial (a limit seen by the supervisor, a cancel).

        Only sets a flag, so it is safe to call from a signal handler.
        """
        if self._stop is None:
            self._stop = violation

    @property
    def stop_requested(self) -> Violation | None:
        """The stop ``request_stop`` recorded, if any (what the next check raises)."""
        return self._stop

    def stop_violation(self, reason: str, rss: int = 0, limit: float = 0.0) -> Violation:
        return Violation(self.number, reason, self.elapsed(), rss, limit)

    def check(self) -> None:
        elapsed = time.monotonic() - self.started
        limits = self.limits
        if self._stop is not None:
            raise GuardPruned(self._stop)
        if limits.timeout_s is not None and elapsed > limits.timeout_s:
            raise GuardPruned(
                Violation(self.number, REASON_TIMEOUT, elapsed, current_rss(), limits.timeout_s)
            )
        if limits.max_rss_bytes is not None:
            rss = current_rss()
            if rss > self.peak_rss:
                self.peak_rss = rss
            if rss > limits.max_rss_bytes:
                raise GuardPruned(
                    Violation(self.number, REASON_MEMORY, elapsed, rss, float(limits.max_rss_bytes))
                )
        if limits.vram_limited:
            self._check_vram(elapsed)

    def _check_vram(self, elapsed: float) -> None:
        """``--max-vram`` on this process's GPU memory (NVML, else torch's counters); unknown
        (no NVML, CUDA unused) passes. The supervisor watches the whole tree."""
        vram = gpus.own_gpu_memory()
        if vram is None:
            return
        self.peak_vram = max(self.peak_vram, vram)
        limit = self._vram_limit
        if limit is None and self.limits.max_vram_percent is not None:
            limit = self._vram_limit = gpus.percent_of(
                self.limits.max_vram_percent, gpus.visible_totals()
            )
        if limit is not None and vram > limit:
            raise GuardPruned(
                Violation(self.number, REASON_GPU_MEMORY, elapsed, vram, float(limit))
            )

    def install(self) -> None:
        """Wrap the trial's ``report`` and ``should_prune`` so each checks the limits first,
        and its suggestions so a stop already requested ends the trial right after one.

        A SIGTERM or an interrupt that lands while a suggestion is being written to the
        storage cannot raise there (it would leave the write half done): it waits for the
        end of that suggestion, instead of being lost in an objective that never checks.
        """
        report = self.trial.report
        should_prune = self.trial.should_prune
        suggest = self.trial._suggest

        def guarded_suggest(name: str, distribution: Any) -> Any:
            value = suggest(name, distribution)
            if self._stop is not None:
                raise GuardPruned(self._stop)
            return value

        def guarded_report(value: float, step: int) -> None:
            self.check()
            report(value, step)

        def guarded_should_prune() -> bool:
            self.check()
            return should_prune()

        self.trial.report = guarded_report  # type: ignore[method-assign]
        self.trial.should_prune = guarded_should_prune  # type: ignore[method-assign]
        self.trial._suggest = guarded_suggest  # type: ignore[method-assign]
        global _active
        _active = self

    def uninstall(self) -> None:
        global _active
        if _active is self:
            _active = None


_active: TrialGuard | None = None


def active_guard() -> TrialGuard | None:
    """The guard of the trial this process is running, if any."""
    return _active


def check(trial: Any) -> None:
    """Check the running trial's limits now; a no-op outside an optguard worker.

    Raises ``optuna.TrialPruned`` (a ``GuardPruned``) when a limit is crossed.
    """
    guard = _active
    if guard is not None and trial is guard.trial:
        guard.check()


def splits(trial: Any, iterable: Iterable[T]) -> Iterator[T]:
    """Yield the items of ``iterable``, checking the trial's limits before each one (CV folds)."""
    for item in iterable:
        check(trial)
        yield item
