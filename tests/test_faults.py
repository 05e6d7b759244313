"""Fault injection: each scenario a real objective file run by ``optguard run``.

For each: the study still reaches its n_trials, no trial stays RUNNING, no process the
scenario started is alive afterwards, the first trial ends in the stated state and reason,
and the log has the lines. Detection latency and memory overshoot are collected and printed
at the end of the session (see ``conftest.pytest_terminal_summary``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from optuna.trial import TrialState

from conftest import FAULT_METRICS, OBJECTIVES, load_trials, log_text, sqlite_url

pytestmark = pytest.mark.scenario

FAST = ["--grace", "1", "--kill-after", "1"]
TIME = ["--timeout", "1", *FAST]
MEMORY = ["--max-rss", "400MB", *FAST]  # no memory grace: interrupted at once


@dataclass(frozen=True)
class Scenario:
    file: str
    args: tuple[str, ...]
    state: TrialState
    reason: str | None = None
    enforcement: str | None = None
    log: tuple[str, ...] = ()


SCENARIOS = {
    "busy_loop": Scenario("busy_loop.py", (*TIME,), TrialState.PRUNED, "timeout", "interrupt",
                          ("Trial #0 pruned: Trial timeout: ", "[interrupt]")),
    "sleep": Scenario("sleep_forever.py", (*TIME,), TrialState.PRUNED, "timeout", "interrupt",
                      ("Trial #0 pruned: Trial timeout: ",)),
    "c_hang": Scenario("c_hang.py", (*TIME,), TrialState.PRUNED, "timeout", "hard_kill",
                       ("interrupting the worker [interrupt]", "killing worker pid",
                        "Trial #0 pruned: Trial timeout: ", "[hard_kill: worker signal SIGKILL")),
    "leak": Scenario("leak.py", (*MEMORY, "--memory-ceiling", "4"), TrialState.PRUNED,
                     "memory", "interrupt", ("no memory grace: interrupting the worker [interrupt]",
                                             "Trial #0 pruned: Memory limit exceeded: ")),
    "leak_grace": Scenario("leak.py", (*MEMORY, "--memory-grace", "1", "--memory-ceiling", "4"),
                           TrialState.PRUNED, "memory", "interrupt",
                           ("pruning at its next check [soft]", "[interrupt]")),
    "leak_ceiling": Scenario("leak.py", ("--max-rss", "400MB", "--memory-grace", "30", *FAST),
                             TrialState.PRUNED, "memory", "hard_kill",
                             ("above the ceiling 1.25x", "Memory limit exceeded: ")),
    "child_leak": Scenario("child_leak.py", (*MEMORY, "--memory-ceiling", "4"),
                           TrialState.PRUNED, "memory", "interrupt",
                           ("Trial #0 pruned: Memory limit exceeded: ", "left 1 process(es)")),
    "leftovers": Scenario("leftovers.py", (), TrialState.COMPLETE, None, None,
                          ("Trial #0 left 1 process(es) running", "left running by trial #0")),
    "ignores_term": Scenario("ignores_term.py", (), TrialState.COMPLETE, None, None,
                             ("sent SIGTERM to 1, SIGKILL to 1",)),
    "segfault": Scenario("segfault.py", (), TrialState.FAIL, "worker_died", None,
                         ("died: signal SIGSEGV", "Worker died: signal SIGSEGV")),
    "hard_exit": Scenario("hard_exit.py", (), TrialState.FAIL, "worker_died", None,
                          ("died: exit code 3",)),
}  # fmt: skip


def _command(study: str, scenario: Scenario) -> list[str]:
    return [
        sys.executable, "-m", "optguard", "run", "--study", study,
        "--objective", f"{OBJECTIVES / 'faults' / scenario.file}:objective",
        "--n-trials", "3", "--pruner", "none", *scenario.args,
    ]  # fmt: skip


def _assert_all_gone(cwd: Path) -> None:
    pids = [int(x) for x in (cwd / "pids.txt").read_text().split()]
    assert pids
    deadline = time.monotonic() + 3
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and _not_zombie(p)]
        time.sleep(0.05)
    assert alive == [], f"still alive: {alive}"


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _check(name: str, scenario: Scenario, cwd: Path, study: str) -> None:
    trials = load_trials(sqlite_url(cwd), study)
    assert len(trials) == 3
    assert all(t.state.is_finished() for t in trials), [t.state for t in trials]
    first, rest = trials[0], trials[1:]
    assert [t.state for t in rest] == [TrialState.COMPLETE] * 2
    assert first.state == scenario.state, first.user_attrs
    attrs = first.user_attrs
    assert attrs.get("optguard.reason") == scenario.reason
    assert attrs.get("optguard.enforcement") == scenario.enforcement
    assert attrs.get("optguard.hard_kill", False) is (scenario.enforcement == "hard_kill")
    # An interrupted worker lives on; a killed or dead one is replaced by a new process.
    replaced = scenario.enforcement == "hard_kill" or scenario.reason == "worker_died"
    assert len({t.user_attrs["optguard.worker"] for t in trials}) == (2 if replaced else 1)
    log = log_text(cwd)
    for phrase in scenario.log:
        assert phrase in log, phrase
    _assert_all_gone(cwd)
    duration = (first.datetime_complete - first.datetime_start).total_seconds()
    limit = attrs.get("optguard.limit")
    FAULT_METRICS.append({
        "scenario": name,
        "outcome": f"{first.state.name} {scenario.reason or ''} {scenario.enforcement or ''}",
        "latency_s": duration - limit if scenario.reason == "timeout" else None,
        "overshoot_mb": (attrs["optguard.peak_rss_bytes"] - limit) / 1e6
        if scenario.reason == "memory" else None,
    })  # fmt: skip


@pytest.mark.parametrize("name", SCENARIOS)
def test_fault(tmp_path: Path, study_name: str, name: str) -> None:
    scenario = SCENARIOS[name]
    result = subprocess.run(
        _command(study_name, scenario), cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    _check(name, scenario, tmp_path, study_name)


def test_worker_sigkilled_from_outside(tmp_path: Path, study_name: str) -> None:
    scenario = Scenario("killed.py", (), TrialState.FAIL, "worker_died", None,
                        ("died during trial #0: signal SIGKILL not sent by optguard",))  # fmt: skip
    proc = subprocess.Popen(
        _command(study_name, scenario), cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "victim.txt").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        worker_pid = int((tmp_path / "pids.txt").read_text().split()[0])
        os.kill(worker_pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    _check("sigkill", scenario, tmp_path, study_name)
    error = load_trials(sqlite_url(tmp_path), study_name)[0].user_attrs["optguard.error"]
    assert "died during trial #0: signal SIGKILL not sent by optguard" in error
    assert "OOM killer" not in error  # the kernel counted no OOM kill: not its doing


def _run(cwd: Path, study: str, file: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command(study, Scenario(file, args, TrialState.COMPLETE)),
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_system_ram_threshold_prunes_the_biggest_trial(tmp_path: Path, study_name: str) -> None:
    """A threshold below what the machine already uses: every running trial gets pruned."""
    used = psutil.virtual_memory().percent
    threshold = f"{max(0.1, used / 2):.1f}"
    result = _run(tmp_path, study_name, "forever.py", "--max-system-ram", threshold, *FAST)
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert [t.state for t in trials] == [TrialState.PRUNED] * 3
    assert {t.user_attrs["optguard.reason"] for t in trials} == {"system_memory"}
    assert {t.user_attrs["optguard.enforcement"] for t in trials} == {"interrupt"}
    log = log_text(tmp_path)
    assert f"> {float(threshold):g}%: trial #0 uses the most" in log
    assert "Trial #0 pruned: Memory limit exceeded: " in log and "system RAM" in log
    _assert_all_gone(tmp_path)


def test_copy_on_write_readers_are_not_overcounted(tmp_path: Path, study_name: str) -> None:
    """Summed RSS passes the limit, PSS does not: the supervisor must not act on RSS alone."""
    result = _run(tmp_path, study_name, "cow_readers.py", "--max-rss", "550MB", *FAST)
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    peak = trials[0].user_attrs["optguard.peak_rss_bytes"]
    assert 250e6 < peak < 550e6  # ~200 MB shared once + the worker, not ~4 x 200 MB
    assert "Memory limit" not in log_text(tmp_path)
    _assert_all_gone(tmp_path)


@pytest.mark.parametrize(
    ("args", "workers", "recycles"),
    # A worker over --recycle-rss recycles after its last trial too: it cannot know the study
    # is complete; its replacement finds nothing left and exits.
    [(("--max-trials-per-worker", "2"), 3, 2), (("--recycle-rss", "1MB"), 5, 5)],
    ids=["max-trials-per-worker", "recycle-rss"],
)
def test_recycling_replaces_workers(
    tmp_path: Path, study_name: str, args: tuple[str, ...], workers: int, recycles: int
) -> None:
    result = subprocess.run(
        [*_command(study_name, Scenario("recycle.py", args, TrialState.COMPLETE)),
         "--n-trials", "5"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    assert len({t.user_attrs["optguard.worker"] for t in trials}) == workers
    log = log_text(tmp_path)
    assert log.count("Recycling worker after ") == recycles
    assert "Worker died" not in log and "0 worker death(s)" in result.stdout


def test_crash_loop_ends_the_run(tmp_path: Path, study_name: str) -> None:
    result = _run(tmp_path, study_name, "always_exit.py", "--n-trials", "20")
    assert result.returncode == 4, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "worker deaths within 60s (last: exit code 3)" in lines[0]
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert len(trials) == 6  # MAX_CRASHES + 1 deaths, each with its trial marked
    assert {t.state for t in trials} == {TrialState.FAIL}
    assert {t.user_attrs["optguard.reason"] for t in trials} == {"worker_died"}
