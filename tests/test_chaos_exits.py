"""Issue 10: ways a run ended wrong (hung, exited 0 on a broken study, blamed the OOM killer):
cases 7-11, 14-16, 22 and 23, plus regressions the review of their fixes found.

Each case is reproduced as it was found, with a real objective file (tests/objectives/
chaos_x_*.py), real worker processes and real signals on SQLite in ``tmp_path``. Every test
checks, where it applies: the study's exact total, no RUNNING or WAITING trial, no process
the scenario started left alive, and the documented exit code (optguard/errors.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from conftest import load_trials, log_text, objective, run_cli, sqlite_url
from optuna.trial import FrozenTrial, TrialState

pytestmark = pytest.mark.scenario

RUN_TIMEOUT_S = 180  # a generous bound for a whole run on a shared 2-core machine
WAIT_S = 90  # for a scenario to reach the state a test acts on
EXIT_WORKERS, EXIT_FAILED, EXIT_INTERRUPTED = 4, 5, 130
SUMMARY = re.compile(r"(\d+) interrupt\(s\), (\d+) hard kill\(s\), (\d+) worker death\(s\)")


# -- running a scenario ---------------------------------------------------------------------
def _command(study: str, target: str, *args: str, n: int = 3, workers: int = 1) -> list[str]:
    return [
        sys.executable, "-m", "optguard", "run", "--study", study,
        "--objective", objective(target), "--n-trials", str(n), "--workers", str(workers),
        "--pruner", "none", *args,
    ]  # fmt: skip


@contextlib.contextmanager
def _running(cwd: Path, cmd: list[str]) -> Iterator[subprocess.Popen[str]]:
    """``optguard run`` in its own session; whatever is left of the scenario is killed after."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.communicate(timeout=30)
        _kill_leftovers(cwd)


def _finish(proc: subprocess.Popen[str], timeout: float = RUN_TIMEOUT_S) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"optguard run did not end within {timeout:g}s") from None


def _run(cwd: Path, cmd: list[str]) -> subprocess.CompletedProcess[str]:
    with _running(cwd, cmd) as proc:
        out, err = _finish(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _wait_for(what: str, ready: Callable[[], bool], proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"run ended (code {proc.returncode}) before {what}: {out}{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"never saw {what}")
        time.sleep(0.05)


def _log(cwd: Path) -> str:
    return log_text(cwd) if (cwd / "logs").exists() else ""


# -- what every scenario must leave behind ----------------------------------------------------
def _scenario_pids(cwd: Path) -> set[int]:
    """Pids the objectives recorded, and every process working in the run's directory
    (workers and what they start inherit it)."""
    pids: set[int] = set()
    path = cwd / "pids.txt"
    if path.exists():
        pids.update(int(x) for x in path.read_text().split())
    for proc in psutil.process_iter(["cwd"]):
        if proc.info["cwd"] and Path(proc.info["cwd"]).is_relative_to(cwd):
            pids.add(proc.pid)
    pids.discard(os.getpid())
    return pids


def _alive(pid: int, cwd: Path) -> bool:
    """Alive, not a zombie, and still the scenario's (a recycled pid working elsewhere is not)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return Path(proc.cwd()).is_relative_to(cwd)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _kill_leftovers(cwd: Path) -> None:
    for pid in _scenario_pids(cwd):
        if _alive(pid, cwd):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _assert_nothing_left(cwd: Path, *, expect_recorded: bool = True) -> None:
    if expect_recorded:
        assert (cwd / "pids.txt").exists(), "the objective never recorded a pid"
    deadline = time.monotonic() + 5
    alive = [p for p in _scenario_pids(cwd) if _alive(p, cwd)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _alive(p, cwd)]
    described = []
    for pid in alive:
        with contextlib.suppress(psutil.Error):
            described.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())[:120]}")
    assert alive == [], f"processes left: {described}"


def _settled(cwd: Path, study: str, total: int | None) -> list[FrozenTrial]:
    """The study's trials: none RUNNING or WAITING, and exactly ``total`` of them."""
    trials = load_trials(sqlite_url(cwd), study)
    unfinished = [(t.number, t.state.name) for t in trials if not t.state.is_finished()]
    assert unfinished == [], f"trials not finished: {unfinished}"
    if total is not None:
        assert len(trials) == total, [(t.number, t.state.name, t.user_attrs) for t in trials]
    return trials


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("optguard: error:")]
    assert len(lines) == 1, f"expected one 'optguard: error:' line on stderr: {stderr!r}"
    return lines[0]


def _summary(stdout: str) -> tuple[int, int, int]:
    """(interrupts, hard kills, worker deaths) from the run's summary line."""
    found = SUMMARY.findall(stdout)
    assert found, f"no summary line in {stdout!r}"
    interrupts, kills, deaths = found[-1]
    return int(interrupts), int(kills), int(deaths)


def _states(trials: list[FrozenTrial]) -> list[str]:
    return [t.state.name for t in trials]


# -- 7. an objective module that hangs at import -------------------------------------------
HANG = "chaos_x_import_hang.py:objective"


def _importing(cwd: Path) -> Callable[[], bool]:
    return lambda: (cwd / "importing.txt").exists() and "Worker started" in _log(cwd)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "cancel"])
def test_import_hang_ends_on_sigterm_sigint_or_cancel(
    tmp_path: Path, study_name: str, how: str
) -> None:
    with _running(tmp_path, _command(study_name, HANG)) as proc:
        _wait_for("the worker hanging in the objective's import", _importing(tmp_path), proc)
        if how == "cancel":
            asked = run_cli("cancel", "--study", study_name, cwd=tmp_path, timeout=60)
            assert asked.returncode == 0, asked.stdout + asked.stderr
        else:
            proc.send_signal(getattr(signal, how))
        out, err = _finish(proc, 60)
    assert proc.returncode == EXIT_INTERRUPTED, out + err
    _settled(tmp_path, study_name, 0)
    _assert_nothing_left(tmp_path)


def test_import_hang_ends_at_start_timeout(tmp_path: Path, study_name: str) -> None:
    result = _run(tmp_path, _command(study_name, HANG, "--start-timeout", "2s"))
    assert result.returncode == EXIT_WORKERS, result.stdout + result.stderr
    line = _error_line(result.stderr)
    assert "--start-timeout" in line, line
    assert re.search(r"\bworker\s*#?\s*0\b", line, re.IGNORECASE), line  # which worker
    _settled(tmp_path, study_name, 0)
    _assert_nothing_left(tmp_path)


# -- 8. a trial leaves a non-daemon thread or a blocking atexit handler ------------------------
LINGERING = re.compile(
    r"(did not|didn't|not|never|failed to) (exit|end|finish|stop)|still (alive|running)"
    r"|\bhung\b|\bhangs?\b|stuck|lingering|blocked",
    re.IGNORECASE,
)


@pytest.mark.parametrize("fn", ["thread", "at_exit"])
def test_worker_that_cannot_exit_is_ended_after_its_last_trial(
    tmp_path: Path, study_name: str, fn: str
) -> None:
    result = _run(tmp_path, _command(study_name, f"chaos_x_lingering.py:{fn}"))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = _settled(tmp_path, study_name, 3)
    assert _states(trials) == ["COMPLETE"] * 3
    log = _log(tmp_path)
    assert "Worker exiting" in log, log
    after = log.rsplit("Worker exiting", 1)[1].splitlines()[1:]
    assert any(LINGERING.search(line) for line in after), (
        "the worker log does not say the worker was ended for not exiting:\n" + log
    )
    _assert_nothing_left(tmp_path)


def test_sigterm_ends_a_run_waiting_for_a_worker_that_cannot_exit(
    tmp_path: Path, study_name: str
) -> None:
    with _running(tmp_path, _command(study_name, "chaos_x_lingering.py:thread")) as proc:
        _wait_for("the worker's last trial", lambda: "Worker exiting" in _log(tmp_path), proc)
        proc.send_signal(signal.SIGTERM)
        out, err = _finish(proc, 60)
    assert proc.returncode in (0, EXIT_INTERRUPTED), out + err
    trials = _settled(tmp_path, study_name, 3)
    assert _states(trials) == ["COMPLETE"] * 3
    _assert_nothing_left(tmp_path)


# -- 9. os._exit(0) inside an objective -----------------------------------------------------
def test_exit_0_in_a_trial_is_a_worker_death(tmp_path: Path, study_name: str) -> None:
    result = _run(tmp_path, _command(study_name, "chaos_x_exit0.py:first"))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = _settled(tmp_path, study_name, 3)
    assert _states(trials) == ["FAIL", "COMPLETE", "COMPLETE"], [t.user_attrs for t in trials]
    first = trials[0].user_attrs
    assert first.get("optguard.reason") == "worker_died", first
    assert "exit code 0" in first.get("optguard.error", ""), first
    assert first["optguard.worker"] != trials[1].user_attrs["optguard.worker"]  # a replacement
    _assert_nothing_left(tmp_path)


def test_always_exit_0_is_not_success(tmp_path: Path, study_name: str) -> None:
    result = _run(tmp_path, _command(study_name, "chaos_x_exit0.py:always", n=20))
    assert result.returncode in (EXIT_WORKERS, EXIT_FAILED), result.stdout + result.stderr
    _error_line(result.stderr)
    trials = _settled(tmp_path, study_name, None)
    assert 1 <= len(trials) < 20
    assert set(_states(trials)) == {"FAIL"}
    assert {t.user_attrs.get("optguard.reason") for t in trials} == {"worker_died"}
    _assert_nothing_left(tmp_path)


# -- 10. every trial fails ------------------------------------------------------------------
def test_fail_fast_same_error(tmp_path: Path, study_name: str) -> None:
    result = _run(tmp_path, _command(study_name, "chaos_x_failing.py:boom", n=20, workers=2))
    assert result.returncode == EXIT_FAILED, result.stdout + result.stderr
    line = _error_line(result.stderr)
    assert "ValueError: boom" in line and "--fail-fast" in line, line
    trials = _settled(tmp_path, study_name, None)
    assert 3 <= len(trials) <= 10, len(trials)  # far fewer than 20
    # The first three failed alike; a trial still running when the run ended may be pruned.
    assert _states(trials)[:3] == ["FAIL"] * 3
    assert {t.user_attrs.get("optguard.error") for t in trials[:3]} == {"ValueError: boom"}
    assert "COMPLETE" not in _states(trials)
    _assert_nothing_left(tmp_path)


def test_fail_fast_non_number_result(tmp_path: Path, study_name: str) -> None:
    result = _run(tmp_path, _command(study_name, "chaos_x_failing.py:pair", n=20))
    assert result.returncode == EXIT_FAILED, result.stdout + result.stderr
    line = _error_line(result.stderr)
    trials = _settled(tmp_path, study_name, None)
    assert 3 <= len(trials) <= 10 and _states(trials)[:3] == ["FAIL"] * 3, _states(trials)
    error = trials[0].user_attrs.get("optguard.error", "")
    assert "tuple" in error, error
    assert error in line, (error, line)
    _assert_nothing_left(tmp_path)


def test_fail_fast_0_runs_every_trial(tmp_path: Path, study_name: str) -> None:
    result = _run(
        tmp_path, _command(study_name, "chaos_x_failing.py:boom", "--fail-fast", "0", n=5)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    trials = _settled(tmp_path, study_name, 5)
    assert _states(trials) == ["FAIL"] * 5
    assert {t.user_attrs.get("optguard.error") for t in trials} == {"ValueError: boom"}
    _assert_nothing_left(tmp_path)


@pytest.mark.parametrize(
    ("fn", "states"),
    [("mixed", ["FAIL"] * 6), ("first_completes", ["COMPLETE"] + ["FAIL"] * 5)],
)
def test_fail_fast_needs_the_first_trials_all_failing_alike(
    tmp_path: Path, study_name: str, fn: str, states: list[str]
) -> None:
    result = _run(tmp_path, _command(study_name, f"chaos_x_failing.py:{fn}", n=6))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = _settled(tmp_path, study_name, 6)
    assert _states(trials) == states
    _assert_nothing_left(tmp_path)


# -- 11. a result too large for a float -----------------------------------------------------
def test_int_too_large_for_a_float_fails_the_trial_not_the_worker(
    tmp_path: Path, study_name: str
) -> None:
    result = _run(tmp_path, _command(study_name, "chaos_x_huge.py:objective", n=6))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = _settled(tmp_path, study_name, 6)
    assert _states(trials) == ["FAIL", "COMPLETE"] * 3, [t.user_attrs for t in trials]
    for t in trials[::2]:
        error = t.user_attrs.get("optguard.error", "")
        assert "too large" in error and "float" in error, error
        assert t.user_attrs.get("optguard.reason") != "worker_died"
    assert len({t.user_attrs["optguard.worker"] for t in trials}) == 1  # the worker went on
    assert _summary(result.stdout)[2] == 0 and "0 worker death(s)" in result.stdout
    _assert_nothing_left(tmp_path)


# -- 14. one numpy call far above the memory ceiling ------------------------------------------
class _HwmPoller(threading.Thread):
    """The highest VmHWM of one process, read from /proc as fast as this thread can."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.highest = 0
        self.reads = 0
        self.done = threading.Event()

    def run(self) -> None:
        path = f"/proc/{self.pid}/status"
        while not self.done.is_set():
            try:
                with open(path, "rb") as fh:
                    text = fh.read()
            except OSError:
                return  # gone
            match = re.search(rb"VmHWM:\s+(\d+) kB", text)
            if match is None:
                return  # a zombie: no memory any more
            self.reads += 1
            self.highest = max(self.highest, int(match.group(1)) * 1024)


@pytest.mark.parametrize(("fn", "bound"), [("normal", 800e6), ("ones", None)])
def test_allocation_above_the_ceiling_is_killed_at_once(
    tmp_path: Path, study_name: str, fn: str, bound: float | None
) -> None:
    cmd = _command(
        study_name, f"chaos_x_big_alloc.py:{fn}", "--max-rss", "200MB", "--kill-after", "5"
    )
    poller = None
    with _running(tmp_path, cmd) as proc:
        pid_file = tmp_path / "worker_pid.txt"
        _wait_for("the first trial's worker pid", pid_file.exists, proc)
        poller = _HwmPoller(int(pid_file.read_text()))
        poller.start()
        time.sleep(0.2)  # the poller is reading
        (tmp_path / "go").touch()
        out, err = _finish(proc)
        poller.done.set()
        poller.join(10)
    assert proc.returncode == 0, out + err
    trials = _settled(tmp_path, study_name, 3)
    assert _states(trials) == ["PRUNED", "COMPLETE", "COMPLETE"], [t.user_attrs for t in trials]
    attrs = trials[0].user_attrs
    assert attrs.get("optguard.reason") == "memory", attrs
    assert attrs.get("optguard.hard_kill") is True, attrs
    assert poller.reads > 0 and poller.highest > 200e6, (poller.reads, poller.highest)
    peak = attrs["optguard.peak_rss_bytes"]
    assert peak >= poller.highest, f"recorded peak {peak} < kernel's VmHWM {poller.highest}"
    if bound is not None:
        assert peak < bound, f"peak {peak / 1e6:.0f}MB: the kill was not immediate"
    assert "signal SIGKILL" in _log(tmp_path), _log(tmp_path)
    _assert_nothing_left(tmp_path)


# -- 15. an interrupt that lands during a long C call ----------------------------------------
HEALTHY = ("--timeout", "1", "--grace", "0.5", "--kill-after", "4")


def _report_hard_kills(cwd: Path, study: str) -> int:
    report = run_cli("report", "--study", study, "--json", cwd=cwd, timeout=120)
    assert report.returncode == 0, report.stderr
    return int(json.loads(report.stdout)["hard_kills"])


def _interrupted(trials: list[FrozenTrial]) -> int:
    return sum(t.user_attrs.get("optguard.enforcement") == "interrupt" for t in trials)


@pytest.mark.parametrize("fn", ["wait", "alloc"])
def test_interrupt_acknowledged_late_is_not_a_hard_kill(
    tmp_path: Path, study_name: str, fn: str
) -> None:
    cmd = _command(study_name, f"chaos_x_slow_alloc.py:{fn}", *HEALTHY, "--max-rss", "8GB")
    result = _run(tmp_path, cmd)
    call = (tmp_path / "call_s.txt").read_text() if (tmp_path / "call_s.txt").exists() else "-"
    assert result.returncode == 0, result.stdout + result.stderr
    trials = _settled(tmp_path, study_name, 3)
    attrs = trials[0].user_attrs
    assert _states(trials) == ["PRUNED", "COMPLETE", "COMPLETE"], (attrs, f"C call: {call}")
    assert attrs.get("optguard.reason") == "timeout", attrs
    assert attrs.get("optguard.enforcement") == "interrupt", (attrs, f"C call: {call}")
    assert not attrs.get("optguard.hard_kill", False), attrs
    interrupts, kills, _ = _summary(result.stdout)
    assert kills == 0 and "0 hard kill(s)" in result.stdout, result.stdout
    assert _report_hard_kills(tmp_path, study_name) == 0
    assert "[hard_kill" not in _log(tmp_path), _log(tmp_path)
    assert interrupts == _interrupted(trials) == 1, result.stdout
    _assert_nothing_left(tmp_path)


def test_self_pruned_trial_is_not_counted_as_interrupted(tmp_path: Path, study_name: str) -> None:
    result = _run(tmp_path, _command(study_name, "chaos_x_slow_alloc.py:self_check", *HEALTHY))
    assert result.returncode == 0, result.stdout + result.stderr
    # The scenario: the supervisor had sent the interrupt when the trial checked.
    assert (tmp_path / "pending.txt").read_text() == "True"
    trials = _settled(tmp_path, study_name, 3)
    attrs = trials[0].user_attrs
    assert _states(trials) == ["PRUNED", "COMPLETE", "COMPLETE"], attrs
    assert (
        attrs.get("optguard.reason") == "timeout" and attrs.get("optguard.enforcement") == "check"
    )
    interrupts, kills, _ = _summary(result.stdout)
    assert interrupts == _interrupted(trials) == 0, result.stdout
    assert kills == 0 == _report_hard_kills(tmp_path, study_name), result.stdout
    _assert_nothing_left(tmp_path)


# -- 16. memory no cleanup can give back ------------------------------------------------------
def test_worker_over_the_limit_after_cleanup_is_replaced(tmp_path: Path, study_name: str) -> None:
    # --memory-grace: the leak's last milliseconds are not caught inside trial #0 itself;
    # --memory-ceiling: nor killed at the ceiling. Later trials check once (trial.report).
    cmd = _command(
        study_name, "chaos_x_global_leak.py:objective", "--max-rss", "300MB",
        "--memory-grace", "2", "--memory-ceiling", "3", n=4,
    )  # fmt: skip
    result = _run(tmp_path, cmd)
    assert result.returncode == 0, result.stdout + result.stderr
    trials = _settled(tmp_path, study_name, 4)
    assert _states(trials) == ["COMPLETE"] * 4, [t.user_attrs for t in trials]
    assert trials[0].user_attrs["optguard.final_rss_bytes"] >= 300e6  # the leak stayed
    assert not any(t.user_attrs.get("optguard.reason") == "memory" for t in trials)
    assert trials[1].user_attrs["optguard.worker"] != trials[0].user_attrs["optguard.worker"]
    lines = _log(tmp_path).splitlines()
    assert any(
        "after cleanup" in line and re.search(r"recycl|replac", line, re.IGNORECASE)
        for line in lines
    ), "\n".join(lines)
    _assert_nothing_left(tmp_path)


# -- 22. trial.study.stop() inside the objective ---------------------------------------------
def test_study_stop_in_the_objective_ends_the_run(tmp_path: Path, study_name: str) -> None:
    result = _run(tmp_path, _command(study_name, "chaos_x_study_stop.py:objective", n=20))
    assert result.returncode == 0, result.stdout + result.stderr
    stopper = int((tmp_path / "stopper.txt").read_text())
    trials = _settled(tmp_path, study_name, stopper + 1)  # that trial was the last
    assert _states(trials) == ["COMPLETE"] * (stopper + 1), [t.user_attrs for t in trials]
    assert "study.stop()" in result.stdout, result.stdout
    _assert_nothing_left(tmp_path)


def test_study_stop_with_two_workers(tmp_path: Path, study_name: str) -> None:
    cmd = _command(study_name, "chaos_x_study_stop.py:objective", n=40, workers=2)
    result = _run(tmp_path, cmd)
    assert result.returncode == 0, result.stdout + result.stderr
    stopper = int((tmp_path / "stopper.txt").read_text())
    trials = _settled(tmp_path, study_name, None)
    assert trials[stopper].state == TrialState.COMPLETE, trials[stopper].user_attrs
    assert set(_states(trials)) == {"COMPLETE"}
    # Only a trial the other worker had already started may follow the stopping one.
    assert len(trials) <= stopper + 2, (stopper, len(trials))
    assert "study.stop()" in result.stdout, result.stdout
    _assert_nothing_left(tmp_path)


# -- 23. optguard's own SIGKILLs and RLIMIT_CPU are not the OOM killer ------------------------
OURS = re.compile(r"optguard|supervisor", re.IGNORECASE)


def _assert_not_oom(cwd: Path, trials: list[FrozenTrial], *texts: str) -> None:
    for text in (_log(cwd), *texts, *(json.dumps(t.user_attrs) for t in trials)):
        assert "OOM" not in text, text


def test_kill_step_sigkill_is_not_called_oom(tmp_path: Path, study_name: str) -> None:
    cmd = _command(
        study_name, "chaos_x_kills.py:c_hang", "--timeout", "1", "--grace", "0.5",
        "--kill-after", "1",
    )  # fmt: skip
    result = _run(tmp_path, cmd)
    assert result.returncode == 0, result.stdout + result.stderr
    trials = _settled(tmp_path, study_name, 3)
    assert _states(trials) == ["PRUNED", "COMPLETE", "COMPLETE"]
    attrs = trials[0].user_attrs
    assert attrs.get("optguard.reason") == "timeout" and attrs.get("optguard.hard_kill") is True
    assert attrs["optguard.limit_s"] == 1.0 and "optguard.limit_bytes" not in attrs
    assert attrs["optguard.peak_mb"] == round(attrs["optguard.peak_rss_bytes"] / 1e6, 1)
    _assert_not_oom(tmp_path, trials, result.stdout, result.stderr)
    log = _log(tmp_path)
    assert any("SIGKILL" in line and OURS.search(line) for line in log.splitlines()), log
    _assert_nothing_left(tmp_path)


def test_cancel_sigkill_is_not_called_oom(tmp_path: Path, study_name: str) -> None:
    cmd = _command(study_name, "chaos_x_kills.py:c_hang", "--kill-after", "1")
    with _running(tmp_path, cmd) as proc:
        _wait_for("trial #0 running", lambda: "Trial #0 started" in _log(tmp_path), proc)
        time.sleep(0.5)  # inside the C call
        asked = run_cli("cancel", "--study", study_name, cwd=tmp_path, timeout=60)
        assert asked.returncode == 0, asked.stdout + asked.stderr
        out, err = _finish(proc)
    assert proc.returncode == EXIT_INTERRUPTED, out + err
    trials = _settled(tmp_path, study_name, None)
    attrs = trials[0].user_attrs
    assert trials[0].state == TrialState.PRUNED and attrs.get("optguard.reason") == "cancelled"
    assert attrs.get("optguard.hard_kill") is True, attrs
    _assert_not_oom(tmp_path, trials, out, err)
    log = _log(tmp_path)
    assert any("SIGKILL" in line and OURS.search(line) for line in log.splitlines()), log
    _assert_nothing_left(tmp_path)


@pytest.mark.parametrize("fn", ["cpu_limit", "cpu_limit_hard"])
def test_rlimit_cpu_death_is_described_as_cpu_limit(
    tmp_path: Path, study_name: str, fn: str
) -> None:
    result = _run(tmp_path, _command(study_name, f"chaos_x_kills.py:{fn}"))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = _settled(tmp_path, study_name, 3)
    assert _states(trials) == ["FAIL", "COMPLETE", "COMPLETE"], [t.user_attrs for t in trials]
    attrs = trials[0].user_attrs
    assert attrs.get("optguard.reason") == "worker_died", attrs
    error = attrs.get("optguard.error", "")
    assert re.search(r"SIGXCPU|RLIMIT_CPU|CPU time", error, re.IGNORECASE), error
    _assert_not_oom(tmp_path, trials, result.stdout, result.stderr)
    _assert_nothing_left(tmp_path)


# -- regressions found by the review of these fixes -----------------------------------------


def test_fail_fast_in_a_run_shorter_than_n(tmp_path: Path, study_name: str) -> None:
    """A run that ends fewer trials than --fail-fast, every one failing alike, is no success."""
    result = _run(tmp_path, _command(study_name, "chaos_x_failing.py:boom", n=2))
    assert result.returncode == EXIT_FAILED, result.stdout + result.stderr
    assert "ValueError: boom" in _error_line(result.stderr)
    assert _states(_settled(tmp_path, study_name, 2)) == ["FAIL", "FAIL"]
    _assert_nothing_left(tmp_path)


def test_worker_dying_at_import_ends_the_run(tmp_path: Path, study_name: str) -> None:
    """Replacing a worker whose import kills it would loop for ever: two deaths before any
    worker was ready end the run (exit 4) with the cause."""
    env = {**os.environ, "CHAOS_DIE_AT_IMPORT": "1"}
    result = subprocess.run(
        _command(study_name, "chaos_x_review.py:objective"), cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 4, result.stdout + result.stderr
    line = _error_line(result.stderr)
    assert "before it was ready" in line and "SIGSEGV" in line, line
    _assert_nothing_left(tmp_path, expect_recorded=False)


def test_outside_sigterm_to_a_worker_gets_it_replaced(tmp_path: Path, study_name: str) -> None:
    """earlyoom or an admin SIGTERMs one worker: its trial ends, and a replacement runs the
    rest of the study (the worker's clean exit is not "the study has its trials")."""
    cmd = _command(study_name, "chaos_x_review.py:waits", n=3)
    with _running(tmp_path, cmd) as proc:
        running = tmp_path / "running.txt"
        _wait_for("a trial running", lambda: running.exists() and running.read_text(), proc)
        (worker,) = [int(p) for p in (tmp_path / "pids.txt").read_text().split()]
        os.kill(worker, signal.SIGTERM)
        _wait_for("the worker gone", lambda: not _alive(worker, tmp_path), proc)
        (tmp_path / "fixed").touch()
        out, err = _finish(proc)
    assert proc.returncode == 0, out + err
    trials = _settled(tmp_path, study_name, None)
    assert trials[0].user_attrs.get("optguard.reason") == "interrupted", trials[0].user_attrs
    assert _states(trials).count("COMPLETE") >= 2 and len(trials) >= 3
    _assert_nothing_left(tmp_path)


_LIBRARY_CALLER = """
import subprocess, sys
import optguard
sleeper = subprocess.Popen(["sleep", "300"])
opts = optguard.resolve_options(
    {"study": sys.argv[1], "objective": sys.argv[2], "n_trials": 2, "pruner": "none"}
)
optguard.run_study(opts)
print("caller's child", "alive" if sleeper.poll() is None else "gone", flush=True)
sleeper.kill()
"""


def test_run_study_leaves_the_callers_own_children_alone(tmp_path: Path, study_name: str) -> None:
    """``run_study`` from Python: the supervisor's sweep of re-parented orphans must not take
    the caller's own child processes (they carry no marker of the run)."""
    result = subprocess.run(
        [sys.executable, "-c", _LIBRARY_CALLER, study_name,
         objective("chaos_x_review.py:objective")],
        cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "caller's child alive" in result.stdout, result.stdout + result.stderr
    _settled(tmp_path, study_name, 2)


def test_a_trial_reaped_while_it_ran_stays_reaped_and_the_worker_goes_on(
    tmp_path: Path, study_name: str
) -> None:
    """Another host finished the trial meanwhile (a reap after missed heartbeats): Optuna
    refuses to tell it, and that is no reason for the worker to die (review of issue 11)."""
    result = _run(tmp_path, _command(study_name, "chaos_x_review.py:reaped_meanwhile", n=2))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = _settled(tmp_path, study_name, 2)
    assert _states(trials) == ["FAIL", "COMPLETE"]
    assert trials[0].user_attrs["optguard.reason"] == "interrupted"
    assert "optguard.final_rss_bytes" not in trials[0].user_attrs  # nothing written to it after
    assert "Trial #0 was already finished by another host" in log_text(tmp_path)
    assert SUMMARY.search(result.stdout).group(3) == "0"  # no worker death
