"""Chaos: the cases of issue 10, each reproduced as it was found, with real processes, real
storage and real signals. This file: cases 1-5 and 17 (restart, zombies, kill -9 of the
supervisor, trial ownership, cross-host reaping, the limits attribute); cases 7-11, 14-16, 22
and 23 are in ``test_chaos_exits.py``, 6, 12 and 13 in ``test_chaos_storage.py``, 10 and
18-21 in ``test_chaos_input.py``.

Every scenario asserts, where it applies: the study ends at its exact total, no trial is left
RUNNING or WAITING, no process the scenario started is left (a zombie counts as gone), and the
documented exit code. Every process a test starts is killed at teardown (``procs``).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import optuna
import psutil
import pytest
import sqlalchemy as sa
from conftest import MYSQL_URL, PG_URL, load_trials, objective, sqlite_url
from optuna.trial import TrialState

pytestmark = pytest.mark.scenario

RESTARTABLE = objective("restartable.py:objective")  # hangs until the file `fixed` exists
FAST = objective("chaos_fast.py:objective")  # returns at once
CHILD = objective("chaos_child.py:objective")  # starts `sleep 1000`, waits for `fixed`
RUN_TIMEOUT = 240  # a whole `optguard run` on a shared, slow machine
EXIT_WORKERS = 4
EXIT_INCOMPLETE = 6
EXIT_USAGE = 2
GUARD = ["--timeout", "0.5", "--grace", "0.5", "--kill-after", "1"]

SUBREAPER = """
import ctypes, os, subprocess, sys, time
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
run = subprocess.Popen(sys.argv[1:])
with open("run.pid", "w") as fh:
    fh.write(str(run.pid))
run.wait()  # reaps the run, and nothing else: its orphans stay zombies here
with open("run.exited", "w") as fh:
    fh.write(str(run.returncode))
while True:
    time.sleep(3600)
"""


# -- processes -------------------------------------------------------------------------------


class Procs:
    """Every process a test starts, and every pid its objectives record: all killed at the
    end, whatever happened (by pid or by the process group of a run we started)."""

    def __init__(self) -> None:
        self.since = time.time() - 1
        self.popens: list[subprocess.Popen[bytes]] = []
        self.pids: set[int] = set()
        self.dirs: set[Path] = set()

    def start(
        self, argv: list[str], cwd: Path, env: dict[str, str] | None = None, name: str = "run"
    ) -> subprocess.Popen[bytes]:
        self.dirs.add(cwd)
        with (cwd / f"{name}.out").open("ab") as out:
            proc = subprocess.Popen(
                argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, **(env or {})},
            )  # fmt: skip
        self.popens.append(proc)
        return proc

    def run(
        self, argv: list[str], cwd: Path, env: dict[str, str] | None = None, name: str = "run"
    ) -> tuple[int, str]:
        """Start, wait (generously), return the exit code and the output."""
        proc = self.start(argv, cwd, env, name)
        try:
            code = proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {RUN_TIMEOUT}s") from None
        return code, (cwd / f"{name}.out").read_text(errors="replace")

    def track(self, *pids: int) -> None:
        self.pids.update(pids)

    def recorded(self) -> set[int]:
        """Pids the objectives wrote (workers to pids.txt, their children to children.txt)."""
        pids = set(self.pids)
        for d in self.dirs:
            for name in ("pids.txt", "children.txt"):
                if (d / name).exists():
                    pids.update(int(p) for p in (d / name).read_text().split())
        return pids

    def cleanup(self) -> None:
        for proc in self.popens:
            if proc.poll() is None:
                _kill_group(proc.pid)
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for pid in self.recorded():
            try:
                p = psutil.Process(pid)
                if p.create_time() >= self.since and p.status() != psutil.STATUS_ZOMBIE:
                    p.kill()  # ours: started during this test
            except psutil.Error:
                pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture
def procs() -> Iterator[Procs]:
    tracker = Procs()
    try:
        yield tracker
    finally:
        tracker.cleanup()


def _alive(pid: int) -> bool:
    """Running: a zombie counts as gone."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _assert_gone(pids: set[int] | list[int], within: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    alive = [p for p in pids if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _alive(p)]
    described = []
    for pid in alive:
        try:
            described.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())[:80]}")
        except psutil.Error:
            described.append(str(pid))
    assert not alive, f"{what} still alive after {within}s: {described}"


def _workers_of(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children() if "worker" in c.cmdline()]
    except psutil.Error:
        return []


def _lines(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


def _wait_for(condition, what: str, within: float = 90.0, proc=None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"waiting for {what}: the run exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s")
        time.sleep(0.05)


# -- storage ----------------------------------------------------------------------------------


_ENGINES: dict[str, sa.Engine] = {}


def _engine(url: str) -> sa.Engine:
    """For the test's own polls: no pool, so no connection outlives a query."""
    if url not in _ENGINES:
        _ENGINES[url] = sa.create_engine(url, poolclass=sa.pool.NullPool)
    return _ENGINES[url]


def _count_states(engine: sa.Engine, study: str) -> Counter[str]:
    sql = sa.text(
        "SELECT t.state, COUNT(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
        "WHERE s.study_name = :s GROUP BY t.state"
    )
    with engine.connect() as conn:
        return Counter({str(state): int(n) for state, n in conn.execute(sql, {"s": study})})


def _unowned_running(engine: sa.Engine, study: str) -> list[int]:
    """RUNNING trials without ``optguard.worker``, in one statement (one snapshot)."""
    sql = sa.text(
        "SELECT t.number FROM trials t JOIN studies s ON s.study_id = t.study_id "
        "WHERE s.study_name = :s AND t.state = 'RUNNING' AND NOT EXISTS ("
        " SELECT 1 FROM trial_user_attributes a"
        " WHERE a.trial_id = t.trial_id AND a.key = 'optguard.worker')"
    )
    with engine.connect() as conn:
        return [int(n) for (n,) in conn.execute(sql, {"s": study})]


def _has_trials_of(engine: sa.Engine, study: str, tag: str) -> bool:
    sql = sa.text(
        "SELECT COUNT(*) FROM trial_user_attributes a JOIN trials t ON t.trial_id = a.trial_id "
        "JOIN studies s ON s.study_id = t.study_id "
        "WHERE s.study_name = :s AND a.key = 'optguard.worker' AND a.value_json = :v"
    )
    with engine.connect() as conn:
        return bool(conn.execute(sql, {"s": study, "v": f'"{tag}"'}).scalar())


def _running(url: str, study: str) -> list[tuple[int, str | None, str | None]]:
    """``(number, optguard.worker, optguard.retry_of)`` of each RUNNING trial, as JSON text."""
    sql = sa.text(
        "SELECT t.number, w.value_json, r.value_json FROM trials t "
        "JOIN studies s ON s.study_id = t.study_id "
        "LEFT JOIN trial_user_attributes w ON w.trial_id = t.trial_id AND w.key = 'optguard.worker' "
        "LEFT JOIN trial_user_attributes r ON r.trial_id = t.trial_id "
        " AND r.key = 'optguard.retry_of' "
        "WHERE s.study_name = :s AND t.state = 'RUNNING'"
    )
    try:
        with _engine(url).connect() as conn:
            return [(int(n), w, r) for n, w, r in conn.execute(sql, {"s": study})]
    except sa.exc.OperationalError:
        return []  # no schema yet


def _assert_settled(trials: list[optuna.trial.FrozenTrial], total: int) -> None:
    """The exact total, every trial finished: none RUNNING, none WAITING."""
    states = Counter(t.state.name for t in trials)
    assert states["RUNNING"] == 0 and states["WAITING"] == 0, dict(states)
    assert len(trials) == total, dict(states)


def _assert_retried(trials: list[optuna.trial.FrozenTrial], old: optuna.trial.FrozenTrial) -> None:
    retries = [t for t in trials if t.user_attrs.get("optguard.retry_of") == old.number]
    assert len(retries) == 1, f"trial #{old.number} retried {len(retries)} times"
    assert retries[0].state == TrialState.COMPLETE, retries[0]
    assert retries[0].params == old.params


def _assert_first_two_reaped_and_retried(
    trials: list[optuna.trial.FrozenTrial], total: int
) -> None:
    """The two trials a killed run left RUNNING: FAIL ``interrupted``, each retried once."""
    _assert_settled(trials, total)
    for old in trials[:2]:
        assert old.state == TrialState.FAIL
        assert old.user_attrs["optguard.reason"] == "interrupted"
        _assert_retried(trials, old)


def _run_argv(study: str, target: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "optguard", "run", "--study", study, "--objective", target,
        "--pruner", "none", *extra,
    ]  # fmt: skip


# -- 1. retries enqueued once the study already has its --n-trials ---------------------------


def test_retry_pruned_after_total_still_runs(tmp_path: Path, study_name: str, procs: Procs) -> None:
    """(1a) Every trial pruned by timeout, then the fix: the retries must run."""
    argv = _run_argv(study_name, RESTARTABLE, "--n-trials", "4", *GUARD)
    code, out = procs.run(argv, tmp_path, name="first")
    assert code == 0, out
    url = sqlite_url(tmp_path)
    pruned = load_trials(url, study_name)
    assert [t.user_attrs.get("optguard.reason") for t in pruned] == ["timeout"] * 4
    _assert_gone(procs.recorded(), what="first run's workers")

    (tmp_path / "fixed").touch()
    code, out = procs.run([*argv, "--retry-pruned", "timeout"], tmp_path, name="rerun")
    assert "enqueued once more the params of #0, #1, #2, #3" in out, out
    assert code == 0, out
    trials = load_trials(url, study_name)
    _assert_settled(trials, 8)
    for old in pruned:
        _assert_retried(trials, old)
    _assert_gone(procs.recorded(), what="rerun's workers")

    code, out = procs.run([*argv, "--retry-pruned", "timeout"], tmp_path, name="again")
    assert code == 0 and "enqueued" not in out, out
    _assert_settled(load_trials(url, study_name), 8)


def test_interrupted_at_total_are_retried(tmp_path: Path, study_name: str, procs: Procs) -> None:
    """(1b) SIGKILL of the supervisor while the study's last trials run."""
    argv = _run_argv(study_name, RESTARTABLE, "--n-trials", "2", "--workers", "2")
    url = sqlite_url(tmp_path)
    run = procs.start(argv, tmp_path, name="first")
    # Both objectives past suggest (they write their pid then): a trial without params has
    # nothing to retry.
    _wait_for(lambda: _lines(tmp_path / "pids.txt") == 2, "2 trials in their loop", proc=run)
    assert len(_running(url, study_name)) == 2
    workers = _workers_of(run.pid)
    procs.track(*workers)
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=30)
    _assert_gone(workers, what="workers of the killed supervisor")
    before = load_trials(url, study_name)
    assert [t.state for t in before] == [TrialState.RUNNING] * 2

    (tmp_path / "fixed").touch()
    code, out = procs.run(argv, tmp_path, name="rerun")
    assert "marked FAIL (interrupted): #0, #1" in out, out
    assert code == 0, out
    _assert_first_two_reaped_and_retried(load_trials(url, study_name), 4)
    _assert_gone(procs.recorded(), what="workers")


def test_run_never_exits_0_with_waiting_retries(
    tmp_path: Path, study_name: str, procs: Procs
) -> None:
    """(1c) Three retries wait; the only worker is SIGTERMed straight (as SLURM does) while it
    runs the first. The run may exit 0 only if it still ran the other two; else exit 6.

    The rerun asks for 6 trials, so the retries fill the total (this does not depend on 1a).
    """
    url = sqlite_url(tmp_path)
    first = _run_argv(study_name, RESTARTABLE, "--n-trials", "3", "--workers", "1", *GUARD)
    code, out = procs.run(first, tmp_path, name="first")
    assert code == 0, out
    reasons = [t.user_attrs.get("optguard.reason") for t in load_trials(url, study_name)]
    assert reasons == ["timeout"] * 3

    # Not fixed yet, and a long limit: the first retry hangs until the worker is SIGTERMed.
    retry = _run_argv(study_name, RESTARTABLE, "--n-trials", "6", "--workers", "1",
                      "--timeout", "5m", "--retry-pruned", "timeout")  # fmt: skip
    run = procs.start(retry, tmp_path, name="retry")
    _wait_for(
        lambda: any(retry_of is not None for _, _, retry_of in _running(url, study_name)),
        "a retry RUNNING", proc=run,
    )  # fmt: skip
    ((victim, _, _),) = _running(url, study_name)
    # In its wait loop (it wrote its pid after suggesting): a SIGTERM that lands inside a
    # storage write is only noted for the next check, and this objective makes none.
    _wait_for(lambda: _lines(tmp_path / "pids.txt") == 4, "the retry in its loop", proc=run)
    (worker,) = _workers_of(run.pid)
    procs.track(worker)
    os.kill(worker, signal.SIGTERM)
    _wait_for(lambda: not _alive(worker), "the SIGTERMed worker exits")
    (tmp_path / "fixed").touch()  # a run that goes on (a new worker) can finish now
    try:
        code = run.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError("the run never ended") from None
    out = (tmp_path / "retry.out").read_text()
    assert "enqueued once more the params of #0, #1, #2" in out, out
    states = Counter(t.state.name for t in load_trials(url, study_name))
    if code == 0:
        assert states["WAITING"] == 0 and states["RUNNING"] == 0, (dict(states), out)
    else:
        assert code == EXIT_INCOMPLETE, out
        assert states["WAITING"] == 2, dict(states)  # what the exit code is about
    _assert_gone(procs.recorded(), what="workers")

    code, out = procs.run(retry, tmp_path, name="final")
    assert code == 0, out
    trials = load_trials(url, study_name)
    _assert_settled(trials, 6)
    stopped = trials[victim]
    assert stopped.state == TrialState.PRUNED
    assert stopped.user_attrs.get("optguard.reason") == "interrupted"
    for old in trials[:3]:
        if old.number != stopped.user_attrs["optguard.retry_of"]:
            _assert_retried(trials, old)
    _assert_gone(procs.recorded(), what="workers")


def test_run_never_exits_0_while_another_run_holds_a_trial(
    tmp_path: Path, study_name: str, procs: Procs
) -> None:
    """(1c) Run B holds a trial (it hangs until B's `fixed`); run A, on the same study, runs
    the one trial left. A may wait for B's trial and exit 0 once the study has its trials, or
    exit 6; exiting 0 while B's trial is still RUNNING would be a lie."""
    run_b, run_a = tmp_path / "b", tmp_path / "a"
    run_b.mkdir()
    run_a.mkdir()
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    b = procs.start(
        _run_argv(study_name, RESTARTABLE, "--storage", url, "--n-trials", "2"), run_b, name="b"
    )
    _wait_for(lambda: _lines(run_b / "pids.txt") == 1, "B's trial in its loop", proc=b)
    a = procs.start(
        _run_argv(study_name, FAST, "--storage", url, "--n-trials", "2"), run_a, name="a"
    )
    _wait_for(lambda: _count_states(_engine(url), study_name)["COMPLETE"] == 1, "A's trial", proc=a)
    try:
        a.wait(timeout=5)  # the time A's workers need to see the total and exit
    except subprocess.TimeoutExpired:
        pass
    ended_before_fix = a.poll() is not None
    (run_b / "fixed").touch()
    try:
        code = a.wait(timeout=RUN_TIMEOUT)
        code_b = b.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError("a run never ended") from None
    out = (run_a / "a.out").read_text()
    if ended_before_fix:  # B's trial could not have finished: the study lacked it
        assert code == EXIT_INCOMPLETE, out
    else:
        assert code in (0, EXIT_INCOMPLETE), out
    assert code_b == 0, (run_b / "b.out").read_text()
    _assert_settled(load_trials(url, study_name), 2)
    _assert_gone(procs.recorded(), what="workers of both runs")


# -- 2. rerun right after kill -9: the dead workers are still zombies -------------------------


def test_rerun_while_killed_workers_are_zombies(
    tmp_path: Path, study_name: str, procs: Procs
) -> None:
    """The first run lives under a subreaper that reaps only the run (as a PID 1 that does not
    reap): its workers, killed with their supervisor, stay zombies during the rerun."""
    argv = _run_argv(study_name, RESTARTABLE, "--n-trials", "6", "--workers", "2")
    url = sqlite_url(tmp_path)
    wrapper = procs.start([sys.executable, "-c", SUBREAPER, *argv], tmp_path, name="first")
    pids = tmp_path / "pids.txt"  # the objectives are past suggest: their trials have params
    _wait_for(lambda: _lines(pids) == 2, "2 trials in their loop", proc=wrapper)
    assert len(_running(url, study_name)) == 2
    supervisor = int((tmp_path / "run.pid").read_text())
    workers = _workers_of(supervisor)
    assert len(workers) == 2, workers
    procs.track(supervisor, *workers)
    os.kill(supervisor, signal.SIGKILL)
    _wait_for(lambda: (tmp_path / "run.exited").exists(), "the wrapper reaps the run", 30)

    def zombies() -> bool:
        try:
            return all(
                psutil.Process(w).status() == psutil.STATUS_ZOMBIE
                and psutil.Process(w).ppid() == wrapper.pid
                for w in workers
            )
        except psutil.NoSuchProcess:
            return False

    _wait_for(zombies, "the killed workers are zombies of the wrapper", 30)

    (tmp_path / "fixed").touch()
    code, out = procs.run(argv, tmp_path, name="rerun")
    assert zombies(), "the reproduction needs the workers still zombies during the rerun"
    assert "marked FAIL (interrupted): #0, #1" in out, out
    assert code == 0, out
    _assert_first_two_reaped_and_retried(load_trials(url, study_name), 6)
    _assert_gone(procs.recorded(), what="workers")

    wrapper.kill()  # the zombies go to init
    wrapper.wait(timeout=30)
    _assert_gone([wrapper.pid], what="the subreaper wrapper")


# -- 3. kill -9 of the supervisor leaks what a trial started ---------------------------------


@pytest.mark.parametrize(
    ("setsid", "own_env"),
    [(False, False), (True, False), (True, True)],
    ids=["same-group", "own-session", "own-session-and-environment"],
)
def test_supervisor_sigkill_ends_trial_children(
    tmp_path: Path, study_name: str, procs: Procs, setsid: bool, own_env: bool
) -> None:
    """``own_env``: the child gets an environment of its own, without the run's marker: the
    keeper still knows it from the supervisor's listing of the worker's tree."""
    argv = _run_argv(study_name, CHILD, "--n-trials", "2", "--workers", "1")
    env = {"CHAOS_SETSID": "1" if setsid else "0", "CHAOS_OWN_ENV": "1" if own_env else "0"}
    url = sqlite_url(tmp_path)
    run = procs.start(argv, tmp_path, env, name="first")
    children = tmp_path / "children.txt"
    _wait_for(lambda: children.exists() and children.read_text().strip(), "sleep started", proc=run)
    (sleep_pid,) = [int(p) for p in children.read_text().split()]
    assert _alive(sleep_pid)
    if own_env:
        time.sleep(2.5)  # the supervisor lists the worker's tree once a second
    if setsid:
        assert os.getsid(sleep_pid) == sleep_pid
    workers = _workers_of(run.pid)
    procs.track(sleep_pid, *workers)
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=30)
    _assert_gone(workers, what="the killed supervisor's worker")
    _assert_gone([sleep_pid], within=10, what="the trial's `sleep 1000`")

    # The rerun after the fix: the trial is reaped and retried, the study ends at its total.
    (tmp_path / "fixed").touch()
    code, out = procs.run(argv, tmp_path, env, name="rerun")
    assert code == 0, out
    trials = load_trials(url, study_name)
    _assert_settled(trials, 2)
    assert trials[0].user_attrs.get("optguard.reason") == "interrupted"
    _assert_retried(trials, trials[0])
    _assert_gone(procs.recorded(), what="workers and their children")


# -- 4. a worker killed between ask() and recording its owner --------------------------------


def test_no_running_trial_without_owner_under_worker_kills(
    tmp_path: Path, study_name: str, procs: Procs
) -> None:
    """SIGKILL random busy workers 24 times while 2 workers run fast trials, polling the
    storage meanwhile. More than 5 deaths a minute end a run with exit 4: 4 runs of 6 kills,
    each ended so, then a last run to a total just above what the study has."""
    runs, kills_per_run = 4, 6
    url = sqlite_url(tmp_path)
    engine = _engine(url)
    rng = random.Random(10)
    host = os.uname().nodename
    seen_unowned: Counter[int] = Counter()

    def poll(run: subprocess.Popen[bytes], kills: int) -> int:
        """Watch the storage until the run ends; SIGKILL a busy worker now and then."""
        next_kill = time.monotonic() + rng.uniform(0.1, 0.4)
        deadline = time.monotonic() + RUN_TIMEOUT
        while run.poll() is None:
            assert time.monotonic() < deadline, "a run never ended"
            try:
                seen_unowned.update(_unowned_running(engine, study_name))
            except sa.exc.OperationalError:
                pass  # no schema yet, or the file is busy: poll again
            if kills and time.monotonic() >= next_kill:
                workers = _workers_of(run.pid)
                procs.track(*workers)
                # In its trial loop (it has claimed a trial), not still importing.
                busy = [w for w in workers if _has_trials_of(engine, study_name, f"{host}:{w}")]
                if busy:
                    try:
                        os.kill(rng.choice(busy), signal.SIGKILL)
                        kills -= 1
                    except ProcessLookupError:
                        pass
                    next_kill = time.monotonic() + rng.uniform(0.1, 0.4)
            time.sleep(0.02)
        return kills

    endless = _run_argv(study_name, FAST, "--n-trials", "1000000", "--workers", "2",
                        "--sampler", "random")  # fmt: skip
    for i in range(runs):
        run = procs.start(endless, tmp_path, name=f"run{i}")
        procs.track(run.pid)
        left = poll(run, kills_per_run)
        out = (tmp_path / f"run{i}.out").read_text()
        assert left == 0, f"run {i} ended after {kills_per_run - left} kills: {out}"
        assert run.returncode == EXIT_WORKERS, out
        states = _count_states(engine, study_name)
        assert states["RUNNING"] == 0, f"run {i} (exit 4) left RUNNING trials: {dict(states)}"

    total = sum(_count_states(engine, study_name).values()) + 20
    final = _run_argv(study_name, FAST, "--n-trials", str(total), "--workers", "2",
                      "--sampler", "random")  # fmt: skip
    run = procs.start(final, tmp_path, name="final")
    poll(run, 0)
    out = (tmp_path / "final.out").read_text()
    assert run.returncode == 0, out
    assert not seen_unowned, f"RUNNING without optguard.worker (trial: polls): {seen_unowned}"
    trials = load_trials(url, study_name)
    _assert_settled(trials, total)
    died = [t for t in trials if t.user_attrs.get("optguard.reason") == "worker_died"]
    assert died, "no kill ever hit a running trial"
    assert len(died) <= runs * kills_per_run
    for t in died:
        assert t.state == TrialState.FAIL
        assert "SIGKILL" in t.user_attrs.get("optguard.error", ""), t.user_attrs
    for t in trials:  # anything else ended early was cut short by a run ending with exit 4
        if t.state != TrialState.COMPLETE and t not in died:
            assert t.user_attrs.get("optguard.reason") == "interrupted", t.user_attrs
    _assert_gone(procs.recorded(), what="supervisors and workers")


# -- 5. across hosts: a host that dies before its trial's first heartbeat --------------------


def _heartbeats(url: str, trial_id: int) -> int:
    sql = sa.text("SELECT COUNT(*) FROM trial_heartbeats WHERE trial_id = :t")
    with _engine(url).connect() as conn:
        return int(conn.execute(sql, {"t": trial_id}).scalar())


@pytest.fixture(params=["postgresql", "mariadb"])
def server_study(request: pytest.FixtureRequest) -> tuple[str, str]:
    if request.param == "postgresql":
        return PG_URL, request.getfixturevalue("pg_study")
    return MYSQL_URL, request.getfixturevalue("mysql_study")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_host_dead_before_first_heartbeat_is_reaped(
    tmp_path: Path, server_study: tuple[str, str], procs: Procs
) -> None:
    url, study = server_study
    probe = subprocess.run(
        ["unshare", "-u", "sh", "-c", "hostname hostb && hostname"],
        check=False, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if probe.returncode != 0 or probe.stdout.strip() != "hostb":
        pytest.skip(f"unshare -u does not work here: {probe.stderr.strip()}")
    host_b, host_a = tmp_path / "hostb", tmp_path / "hosta"
    host_b.mkdir()
    host_a.mkdir()
    # Host A's 3 own trials take 4 s each: the reaper (within a few 1 s intervals) finds host
    # B's trial before the total is reached, so the retry counts toward it.
    total = 4

    # Host B: beats every 30 s, dies (all of it) right after its trial is RUNNING.
    argv_b = _run_argv(study, RESTARTABLE, "--storage", url, "--heartbeat", "30",
                       "--n-trials", str(total), "--workers", "1")  # fmt: skip
    cmd_b = "hostname hostb && exec " + " ".join(f"'{a}'" for a in argv_b)
    run_b = procs.start(["unshare", "-u", "sh", "-c", cmd_b], host_b, name="hostb")
    _wait_for(lambda: _lines(host_b / "pids.txt") == 1, "host B's trial RUNNING", proc=run_b)
    workers_b = _workers_of(run_b.pid)
    procs.track(*workers_b)
    _kill_group(run_b.pid)
    for pid in workers_b:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    run_b.wait(timeout=30)
    _assert_gone(workers_b, what="host B's workers")
    (ghost,) = load_trials(url, study)
    assert ghost.state == TrialState.RUNNING
    assert ghost.user_attrs["optguard.worker"].startswith("hostb:")
    assert _heartbeats(url, ghost._trial_id) == 0, "the reproduction needs a trial never beaten"

    # Host A (this host): its own trials take a few seconds, so its reaper runs meanwhile.
    (host_a / "fixed").touch()
    argv_a = _run_argv(study, RESTARTABLE, "--storage", url, "--heartbeat", "1",
                       "--n-trials", str(total), "--workers", "1")  # fmt: skip
    code, out = procs.run(argv_a, host_a, env={"OPTGUARD_TEST_SLOW": "4"}, name="hosta")
    assert code == 0, out
    trials = load_trials(url, study)
    first = trials[0]
    assert first.state == TrialState.FAIL, (first.state, out)
    assert first.user_attrs.get("optguard.reason") == "interrupted"
    assert "no heartbeat" in first.user_attrs.get("optguard.error", ""), first.user_attrs
    _assert_retried(trials, first)
    _assert_settled(trials, total)
    _assert_gone(procs.recorded(), what="workers of both hosts")


# -- 17. optguard.limits is rewritten only by a run that runs trials --------------------------


def test_limits_attr_only_changed_by_a_run_that_runs(
    tmp_path: Path, study_name: str, procs: Procs
) -> None:
    url = sqlite_url(tmp_path)

    def limits() -> dict[str, object]:
        return optuna.load_study(study_name=study_name, storage=url).user_attrs["optguard.limits"]

    base = _run_argv(study_name, FAST, "--n-trials", "2")
    code, out = procs.run([*base, "--timeout", "5s"], tmp_path, name="first")
    assert code == 0, out
    first = limits()
    assert first["timeout_s"] == 5

    code, out = procs.run([*base, "--timeout", "99s"], tmp_path, name="nothing")
    assert code == 0, out
    _assert_settled(load_trials(url, study_name), 2)
    assert limits() == first, "a run that ran nothing rewrote optguard.limits"

    bad = _run_argv(study_name, objective("chaos_fast.py:missing"), "--n-trials", "4",
                    "--max-rss", "1GB", "--timeout", "7s")  # fmt: skip
    code, out = procs.run(bad, tmp_path, name="bad")
    assert code == EXIT_USAGE, out
    assert limits() == first, "a run that failed rewrote optguard.limits"
    _assert_settled(load_trials(url, study_name), 2)

    code, out = procs.run(
        [*_run_argv(study_name, FAST, "--n-trials", "4"), "--timeout", "7s", "--max-rss", "2GB"],
        tmp_path, name="more",
    )  # fmt: skip
    assert code == 0, out
    assert limits() == {"timeout_s": 7, "max_rss_bytes": 2_000_000_000}
    _assert_settled(load_trials(url, study_name), 4)
    report = subprocess.run(
        [sys.executable, "-m", "optguard", "report", "--study", study_name, "--storage", url,
         "--json"],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    import json

    assert json.loads(report.stdout)["limits"] == {"timeout_s": 7, "max_rss_bytes": 2_000_000_000}
    _assert_gone(procs.recorded(), what="workers")


# -- extra (not in issue 10): SIGTERM straight to a worker right after it claimed a trial ----


def test_worker_sigterm_right_after_claim_ends_its_trial(
    tmp_path: Path, study_name: str, procs: Procs
) -> None:
    """README: SIGTERM sent straight to a worker (SLURM, Kubernetes) ends its running trial at
    once, reason ``interrupted``, and the worker exits. Sent as soon as the trial is RUNNING
    (before or while the objective makes its first storage write) to an objective that never
    checks, it must not be lost."""
    url = sqlite_url(tmp_path)
    engine = _engine(url)
    run = procs.start(
        _run_argv(study_name, RESTARTABLE, "--n-trials", "2", "--workers", "1"), tmp_path
    )

    def running() -> bool:
        try:
            return _count_states(engine, study_name)["RUNNING"] > 0
        except sa.exc.OperationalError:
            return False

    deadline = time.monotonic() + 90
    while not running():
        assert run.poll() is None and time.monotonic() < deadline, "no trial RUNNING"
        time.sleep(0.002)
    (worker,) = _workers_of(run.pid)
    procs.track(worker)
    os.kill(worker, signal.SIGTERM)
    _assert_gone([worker], within=20, what="the SIGTERMed worker (its trial never checks)")
    first = load_trials(url, study_name)[0]
    assert first.state.is_finished(), first.state
    assert first.user_attrs.get("optguard.reason") == "interrupted", first.user_attrs

    (tmp_path / "fixed").touch()
    try:
        code = run.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError("the run never ended") from None
    out = (tmp_path / "run.out").read_text()
    states = Counter(t.state.name for t in load_trials(url, study_name))
    assert states["RUNNING"] == 0, dict(states)
    if code == 0:
        assert states["WAITING"] == 0 and sum(states.values()) >= 2, (dict(states), out)
    else:
        assert code == EXIT_INCOMPLETE, out
    _assert_gone(procs.recorded(), what="workers")


# -- regression found by the review: a worker started by hand never beats ---------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_hand_started_workers_trial_is_not_reaped(
    tmp_path: Path, study_name: str, procs: Procs
) -> None:
    """A worker started by hand (a scheduler's ``optguard worker``) has no supervisor to beat
    for its trial: another host's reaper must not give it a first beat and then reap it."""
    probe = subprocess.run(
        ["unshare", "-u", "sh", "-c", "hostname hostb && hostname"],
        check=False, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if probe.returncode != 0 or probe.stdout.strip() != "hostb":
        pytest.skip(f"unshare -u does not work here: {probe.stderr.strip()}")
    host_b, host_a = tmp_path / "hostb", tmp_path / "hosta"
    host_b.mkdir()
    host_a.mkdir()
    url = sqlite_url(tmp_path)
    optuna.create_study(study_name=study_name, storage=url)
    argv_b = [sys.executable, "-m", "optguard", "worker", "--study", study_name,
              "--objective", RESTARTABLE, "--n-trials", "2", "--storage", url]  # fmt: skip
    cmd_b = "hostname hostb && exec " + " ".join(f"'{a}'" for a in argv_b)
    worker_b = procs.start(["unshare", "-u", "sh", "-c", cmd_b], host_b, name="hostb")
    _wait_for(lambda: _lines(host_b / "pids.txt") == 1, "host B's trial RUNNING", proc=worker_b)

    (host_a / "fixed").touch()
    argv_a = _run_argv(study_name, RESTARTABLE, "--storage", url, "--heartbeat", "1",
                       "--n-trials", "2", "--workers", "1")  # fmt: skip
    run_a = procs.start(argv_a, host_a, name="hosta")
    # Host A's part is done at once; it waits for host B's trial, reaping every second.
    _wait_for(lambda: _lines(host_a / "pids.txt") == 1, "host A's trial", proc=run_a)
    time.sleep(8)  # 8 heartbeats of host A: a first beat and then 4 intervals would reap it
    (trial_b,) = [t for t in load_trials(url, study_name) if t.number == 0]
    assert trial_b.state == TrialState.RUNNING, trial_b.user_attrs
    assert trial_b.user_attrs["optguard.worker"].startswith("hostb:")
    assert run_a.poll() is None, "host A must wait for host B's running trial"

    (host_b / "fixed").touch()
    assert worker_b.wait(timeout=RUN_TIMEOUT) == 0
    assert run_a.wait(timeout=RUN_TIMEOUT) == 0
    trials = load_trials(url, study_name)
    _assert_settled(trials, 2)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    _assert_gone(procs.recorded(), what="both hosts' workers")
