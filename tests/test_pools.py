"""Pools a trial keeps for the next trials survive it; what it really left behind does not.

The rule (``optguard.leftovers.decide``) from a table of facts; the facts
(``leftovers.gather``) from real processes; then whole runs with joblib, ``multiprocessing``
pools, a dropped pool and a leak inside a pool worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import psutil
import pytest
from conftest import OBJECTIVES, load_trials, log_text, sqlite_url
from optuna.trial import TrialState

from optguard.leftovers import (
    EXITED,
    KEPT_POOL,
    NOT_CONNECTED,
    NOT_KEEPING,
    OWN,
    PARENT_ENDED,
    TOO_BIG,
    ProcFacts,
    decide,
)

W = 100  # the worker's pid in the table
MB = 10**6


def F(pid: int, ppid: int = W, **facts: object) -> ProcFacts:
    return ProcFacts(pid, ppid, **facts)  # type: ignore[arg-type]


KEEP_CASES = {
    "a pool worker or tracker: a channel to the worker": ([F(1, connected=True)], {1: KEPT_POOL}),
    "sleep 1000: nothing shared but stdio": ([F(1)], {1: NOT_CONNECTED}),
    "alive before the first trial": ([F(1, own=True)], {1: OWN}),
    "exited, not reaped yet": ([F(1, zombie=True)], {1: EXITED}),
    "a forkserver and its pool workers": (
        [F(1, connected=True), F(2, 1, connected=True), F(3, 1, connected=True)],
        {1: KEPT_POOL, 2: KEPT_POOL, 3: KEPT_POOL},
    ),
    "a sleep a pool task started": (
        [F(1, connected=True), F(2, 1)], {1: KEPT_POOL, 2: NOT_CONNECTED}
    ),
    "a fork of an ended process, inheriting the worker's pipes": (
        [F(1), F(2, 1, connected=True)], {1: NOT_CONNECTED, 2: PARENT_ENDED}
    ),
    "parent gone meanwhile": ([F(2, 1, connected=True)], {2: PARENT_ENDED}),
    "parent a zombie": ([F(1, zombie=True), F(2, 1, connected=True)], {1: EXITED, 2: PARENT_ENDED}),
    "a child of a process alive before the first trial": (
        [F(1, own=True), F(2, 1, connected=True)], {1: OWN, 2: KEPT_POOL}
    ),
}  # fmt: skip

NO_KEEP_CASES = {
    "a pool worker": ([F(1, connected=True)], {1: NOT_KEEPING}),
    "alive before the first trial": ([F(1, own=True), F(2, 1)], {1: OWN, 2: NOT_KEEPING}),
}

ROOM_CASES = {
    "within the room": ([F(1, connected=True, memory=50 * MB)], 100 * MB, {1: KEPT_POOL}),
    "no limit": ([F(1, connected=True, memory=50_000 * MB)], None, {1: KEPT_POOL}),
    "the leaking pool worker goes, the others stay": (
        [F(1, connected=True, memory=400 * MB), F(2, connected=True, memory=20 * MB),
         F(3, connected=True, memory=10 * MB)],
        100 * MB, {1: TOO_BIG, 2: KEPT_POOL, 3: KEPT_POOL},
    ),
    "the biggest first, until they fit": (
        [F(1, connected=True, memory=60 * MB), F(2, connected=True, memory=50 * MB),
         F(3, connected=True, memory=40 * MB)],
        100 * MB, {1: TOO_BIG, 2: KEPT_POOL, 3: KEPT_POOL},
    ),
    "its children go with it": (
        [F(1, connected=True, memory=300 * MB), F(2, 1, connected=True, memory=MB)],
        100 * MB, {1: TOO_BIG, 2: PARENT_ENDED},
    ),
    "processes from before the first trial count, but stay": (
        [F(1, own=True, memory=90 * MB), F(2, connected=True, memory=20 * MB)],
        100 * MB, {1: OWN, 2: TOO_BIG},
    ),
    "zombies hold nothing": (
        [F(1, zombie=True, memory=0), F(2, connected=True, memory=90 * MB)],
        100 * MB, {1: EXITED, 2: KEPT_POOL},
    ),
}  # fmt: skip


def _whys(procs: list[ProcFacts], keep: bool, room: int | None = None) -> dict[int, str]:
    verdicts = decide(procs, W, keep, room)
    for verdict in verdicts.values():
        assert verdict.keep == (verdict.why in (KEPT_POOL, OWN, EXITED)), verdict
    return {pid: v.why.split(" (")[0] for pid, v in verdicts.items()}


@pytest.mark.parametrize("name", KEEP_CASES)
def test_decide_keeping_pools(name: str) -> None:
    procs, expected = KEEP_CASES[name]
    assert _whys(procs, keep=True) == expected


@pytest.mark.parametrize("name", NO_KEEP_CASES)
def test_decide_no_keep_pools(name: str) -> None:
    procs, expected = NO_KEEP_CASES[name]
    assert _whys(procs, keep=False) == expected


@pytest.mark.parametrize("name", ROOM_CASES)
def test_decide_memory_room(name: str) -> None:
    procs, room, expected = ROOM_CASES[name]
    assert _whys(procs, keep=True, room=room) == expected


# A stand-in for the worker, its stdio a pipe (the test's), with one child of each kind.
FACTS_SCRIPT = r"""
import json, os, socket, subprocess, sys
import psutil
from optguard import leftovers

def child(*fds):
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=fds
    )

kids = {}
before = subprocess.Popen(["sleep", "60"])
try:
    own = leftovers.start_times([psutil.Process(before.pid)])
    r, w = os.pipe()
    kids["holds a pipe the worker holds"] = child(r)
    r2, w2 = os.pipe()
    kids["its pipe closed by the worker"] = child(r2)
    os.close(r2), os.close(w2)
    a, b = socket.socketpair()
    kids["holds a socketpair end"] = child(b.fileno())
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    kids["shares only a TCP socket"] = child(tcp.fileno())
    kids["shares only stdio"] = subprocess.Popen(["sleep", "60"])
    procs = psutil.Process().children(recursive=True)
    facts = leftovers.gather(procs, own, leftovers.worker_channels(os.getpid()), room=10**12)
    by_pid = {f.pid: f for f in facts}
    out = {name: by_pid[p.pid].connected for name, p in kids.items()}
    out["own"] = by_pid[before.pid].own
    out["memory"] = min(f.memory for f in facts)
    print(json.dumps(out))
finally:
    for p in [*kids.values(), before]:
        p.kill()
        p.wait()
"""


def test_facts_from_real_processes() -> None:
    """Only a pipe or Unix socket the worker still holds connects; stdio (here a pipe the
    test reads), a TCP socket both inherited and a pipe the worker closed do not."""
    result = subprocess.run(
        [sys.executable, "-c", FACTS_SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts == {
        "holds a pipe the worker holds": True,
        "its pipe closed by the worker": False,
        "holds a socketpair end": True,
        "shares only a TCP socket": False,
        "shares only stdio": False,
        "own": True,
        "memory": facts["memory"],
    }
    assert facts["memory"] > 0


# -- whole runs --------------------------------------------------------------------------------

FAST = ["--grace", "1", "--kill-after", "1"]


def _run(cwd: Path, study: str, file: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "optguard", "run", "--study", study,
         "--objective", f"{OBJECTIVES / file}:objective", "--pruner", "none", *args],
        cwd=cwd, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def _records(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def _assert_all_gone(cwd: Path) -> None:
    """Nothing the run started (workers, pools, trackers, sleeps) outlives it."""
    pids = {int(p) for rec in _records(cwd / "pids.txt") for p in rec}
    assert pids
    deadline = time.monotonic() + 3
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = {p for p in pids if _running(p)}
        time.sleep(0.05)
    assert alive == set(), f"still alive: {alive}"


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _assert_pools_kept(cwd: Path, n_jobs: int) -> None:
    """Per worker: the same processes under it after every trial, and never more pool
    workers than the pool has (a restarted pool brings new pids)."""
    per_worker: dict[str, list[list[str]]] = defaultdict(list)
    for worker, _trial, used, *tree in _records(cwd / "pools.txt"):
        per_worker[worker].append([used, *tree])
    assert max(len(v) for v in per_worker.values()) >= 2, per_worker
    for worker, seen in per_worker.items():
        trees = {tuple(rec[1:]) for rec in seen}
        assert len(trees) == 1, (worker, trees)
        used = {pid for rec in seen for pid in rec[0].split(",")}
        assert len(used) <= n_jobs, (worker, used)


def _outs(cwd: Path) -> str:
    return "".join(p.read_text() for p in sorted((cwd / "logs").glob("*.out")))


@pytest.mark.scenario
@pytest.mark.parametrize("file", ["pools_joblib.py", "pools_mp.py"], ids=["joblib", "mp_pool"])
def test_pool_survives_trials(tmp_path: Path, study_name: str, file: str) -> None:
    """joblib n_jobs=2 (loky's reusable executor), a multiprocessing pool in a global."""
    result = _run(tmp_path, study_name, file, "--workers", "2", "--n-trials", "8")
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8
    _assert_pools_kept(tmp_path, n_jobs=2)
    log = log_text(tmp_path)
    assert "process(es) running" not in log
    assert "keeping " in log and KEPT_POOL in log
    assert _outs(tmp_path) == ""  # no resource_tracker warnings, no KeyError tracebacks
    _assert_all_gone(tmp_path)


@pytest.mark.scenario
def test_no_keep_pools_ends_them(tmp_path: Path, study_name: str) -> None:
    result = _run(
        tmp_path, study_name, "pools_joblib.py", "--n-trials", "3", "--no-keep-pools"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    used = [rec[2] for rec in _records(tmp_path / "pools.txt")]
    assert len(used) == 3 and len(set(used)) == 3  # a new pool every trial
    log = log_text(tmp_path)
    assert log.count("process(es) running: sent SIGTERM") >= 2 and NOT_KEEPING in log
    _assert_all_gone(tmp_path)


@pytest.mark.scenario
def test_dropped_pool_and_sleep_are_ended(tmp_path: Path, study_name: str) -> None:
    """A pool the trial lost the reference to and a ``sleep 1000``: gone before the next
    trial of the same worker starts."""
    result = _run(tmp_path, study_name, "pools_dropped.py", "--workers", "2", "--n-trials", "6")
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    assert _records(tmp_path / "alive.txt") == []
    log = log_text(tmp_path)
    assert log.count("left 1 process(es) running") == 6 and NOT_CONNECTED in log
    _assert_all_gone(tmp_path)


@pytest.mark.scenario
def test_leak_in_a_pool_worker(tmp_path: Path, study_name: str) -> None:
    """Its memory counts in the worker's tree: the trial is pruned for memory, and the pool
    worker holding the leak is dead before the trial is told; the pool goes on."""
    result = _run(
        tmp_path, study_name, "pools_leak.py",
        "--workers", "2", "--n-trials", "5", "--max-rss", "300MB", *FAST,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load_trials(sqlite_url(tmp_path), study_name)
    first, rest = trials[0], trials[1:]
    assert first.state == TrialState.PRUNED, first.user_attrs
    assert first.user_attrs["optguard.reason"] == "memory"
    assert [t.state for t in rest] == [TrialState.COMPLETE] * 4
    after = _records(tmp_path / "after.txt")
    assert len(after) == 4 and {rec[2] for rec in after} == {"gone"}, after
    _assert_all_gone(tmp_path)


def test_option_from_flags_and_config(tmp_path: Path) -> None:
    from optguard.config import resolve_options
    from optguard.supervision.workers import worker_argv

    base = {"study": "s", "objective": "o.py:f"}
    assert resolve_options(base).keep_pools is True
    assert "--no-keep-pools" not in worker_argv(resolve_options(base), 0)
    off = resolve_options({**base, "keep_pools": False})
    assert "--no-keep-pools" in worker_argv(off, 0)
    config = tmp_path / "c.toml"
    config.write_text("keep_pools = false\n")
    assert resolve_options(base, config).keep_pools is False
    assert resolve_options({**base, "keep_pools": True}, config).keep_pools is True
