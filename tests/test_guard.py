"""The cooperative guard and the cleanup, in-process on a real in-memory Optuna study."""

from __future__ import annotations

import gc
import re
import subprocess
import sys
import time

import optuna
import pytest

import optguard
from optguard.cleanup import release_memory
from optguard.guard import GuardPruned, TrialGuard
from optguard.limits import Limits


def _trial() -> optuna.trial.Trial:
    return optuna.create_study().ask()


def test_report_and_should_prune_check_time_first() -> None:
    trial = _trial()
    guard = TrialGuard(trial, Limits(timeout_s=0.05, max_rss_bytes=None))
    guard.install()
    try:
        trial.report(1.0, 0)  # within the limit: recorded as usual
        assert trial.should_prune() is False
        time.sleep(0.06)
        with pytest.raises(GuardPruned) as info:
            trial.report(2.0, 1)
    finally:
        guard.uninstall()
    assert isinstance(info.value, optuna.TrialPruned)
    # a 0.05 s limit in seconds, never "0.0min"; the value printed above the limit
    shown = re.fullmatch(r"Trial timeout: (\d+\.\d+)s", str(info.value))
    assert shown and float(shown.group(1)) > 0.05, str(info.value)
    assert info.value.violation.detail == "limit 0.05s"
    seen = info.value.violation
    assert (seen.reason, seen.enforcement) == ("timeout", "check")
    assert seen.elapsed_s > 0.05 and seen.limit == 0.05
    assert seen.log_line().startswith(f"Trial #{trial.number} pruned: Trial timeout: ")


def test_memory_limit_prunes_at_should_prune() -> None:
    trial = _trial()
    guard = TrialGuard(trial, Limits(timeout_s=None, max_rss_bytes=1))
    guard.install()
    try:
        with pytest.raises(GuardPruned) as info:
            trial.should_prune()
    finally:
        guard.uninstall()
    violation = info.value.violation
    assert violation.reason == "memory" and violation.rss_bytes > 1
    assert violation.phrase.startswith("Memory limit exceeded: ")


def test_check_and_splits_follow_the_active_guard() -> None:
    trial = _trial()
    other = _trial()
    optguard.check(trial)  # no guard active: a no-op, so objectives also run without optguard
    guard = TrialGuard(trial, Limits(timeout_s=0.02, max_rss_bytes=None))
    guard.install()
    try:
        assert list(optguard.splits(trial, range(3))) == [0, 1, 2]
        time.sleep(0.03)
        optguard.check(other)  # another trial's guard is not this one
        with pytest.raises(GuardPruned):
            optguard.check(trial)
        with pytest.raises(GuardPruned):
            next(iter(optguard.splits(trial, range(3))))
    finally:
        guard.uninstall()
    optguard.check(trial)  # uninstalled: no-op again


def test_request_stop_prunes_at_next_check() -> None:
    trial = _trial()
    guard = TrialGuard(trial, Limits(timeout_s=None, max_rss_bytes=None))
    guard.request_stop(guard.stop_violation("cancelled"))
    guard.request_stop(guard.stop_violation("later"))  # the first request wins
    with pytest.raises(GuardPruned, match="Trial stopped: cancelled"):
        guard.check()


def test_cleanup_collects_cycles_and_reports() -> None:
    class Node:
        def __init__(self) -> None:
            self.ref = self
            self.payload = bytearray(1000)

    gc.disable()  # keep the automatic collector from finding the cycles first
    try:
        for _ in range(10_000):
            Node()
        report = release_memory()
    finally:
        gc.enable()
    assert report.collected >= 10_000
    assert 1 <= report.gc_passes <= 3
    assert report.rss_after > 0 and report.seconds < 5
    assert report.malloc_trimmed is True  # glibc on this machine


def test_cleanup_never_imports_torch() -> None:
    code = (
        "import sys; from optguard.cleanup import release_memory; r = release_memory(); "
        "print('torch' in sys.modules, r.cuda_emptied)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_import_optguard_is_light() -> None:
    code = "import sys, optguard; print(sorted(m for m in ('optuna','sqlalchemy','torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
