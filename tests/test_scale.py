"""Many hosts on one PostgreSQL study, on a private server with a small ``max_connections``:
each "host" is its own ``optguard run`` in its own UTS namespace (its own hostname, so
``optguard.worker`` reads ``scale-hostK:pid`` as on a real node). The study's total must be
exact with no connection error, a host must hold at most 2 connections, and a host killed
the way a scheduler kills a job must leave nothing RUNNING and its trials retried by the
hosts still running."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import optuna
import psycopg
import pytest
from conftest import REPO, objective
from optuna.trial import TrialState

sys.path.insert(0, str(REPO / "scripts"))
import private_pg  # noqa: E402

HOSTS = 6
WORKERS = 2
MAX_CONNECTIONS = 20
CONNECTIONS_PER_HOST = 2  # the supervisor's storage gateway: workers reach it, not the server
HOST_TIMEOUT_S = 120

pytestmark = [
    pytest.mark.scenario,
    pytest.mark.skipif(
        not private_pg.available() or shutil.which("unshare") is None or os.geteuid() != 0,
        reason="needs PostgreSQL server binaries, unshare and root (UTS namespaces)",
    ),
]


@dataclass
class Host:
    """One "node": ``optguard run`` in its own session (so the scheduler's SIGKILL can take
    its whole process group) with its own log directory and output files."""

    name: str
    proc: subprocess.Popen[bytes]
    directory: Path

    def output_files(self) -> list[Path]:
        return [self.directory / "stderr.txt", *sorted((self.directory / "logs").glob("*.log"))]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A private server of its own, ``max_connections`` 20: no other client shares the limit."""
    with private_pg.private_postgres(max_connections=MAX_CONNECTIONS) as url:
        yield url


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    """The hosts a test starts; any still alive at the end is SIGKILLed with its group."""
    started: list[Host] = []
    yield started
    for host in started:
        if host.proc.poll() is None:
            os.killpg(host.proc.pid, signal.SIGKILL)
            host.proc.wait()


def _create_study(url: str, name: str) -> None:
    """Created once, before the hosts start, with its pool closed afterwards: an idle pooled
    connection of the test would count among the hosts'."""
    storage = optuna.storages.RDBStorage(url)
    try:
        optuna.create_study(study_name=name, storage=storage, direction="minimize")
    finally:
        storage.remove_session()
        storage.engine.dispose()


def _trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.remove_session()
        storage.engine.dispose()


def _start_host(
    index: int, tmp_path: Path, url: str, study: str, target: str, n_trials: int, *extra: str
) -> Host:
    name = f"scale-host{index}"
    directory = tmp_path / name
    directory.mkdir()
    run = [sys.executable, "-m", "optguard", "run", "--study", study, "--storage", url,
           "--objective", target, "--workers", str(WORKERS), "--n-trials", str(n_trials),
           "--sampler", "random", "--log-dir", str(directory / "logs"), *extra]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTGUARD_")}
    with open(directory / "stdout.txt", "wb") as out, open(directory / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(
            private_pg.as_host(name, run),  # proc.pid is the supervisor itself
            cwd=directory, env=env, stdout=out, stderr=err, start_new_session=True,
        )  # fmt: skip
    return Host(name, proc, directory)


def _wait(host: Host) -> int:
    try:
        return host.proc.wait(timeout=HOST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(host.proc.pid, signal.SIGKILL)
        host.proc.wait()
        return -signal.SIGKILL


def _running_on(url: str, study: str, host: str) -> int:
    """Trials RUNNING now whose owner (``optguard.worker``, ``host:pid``) is on ``host``; 0
    when the server refuses this short connection (full: the hosts' failure, asserted later)."""
    try:
        rows = private_pg.query(
            url,
            "SELECT count(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
            "JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
            "AND a.key = 'optguard.worker' "
            "WHERE s.study_name = %s AND t.state = 'RUNNING' AND a.value_json LIKE %s",
            (study, f'"{host}:%'),
        )
    except psycopg.OperationalError:
        return 0
    return int(rows[0][0])


def _unfinished(trials: list[optuna.trial.FrozenTrial]) -> list[int]:
    return [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def test_six_hosts_reach_the_exact_total_within_their_connections(
    tmp_path: Path, pg_url: str, study_name: str, hosts: list[Host]
) -> None:
    n_trials = 48
    _create_study(pg_url, study_name)
    roots: dict[str, int] = {}
    group_of = private_pg.namespace_groups(roots)
    with private_pg.ConnectionSampler(pg_url, interval_s=0.05, group_of=group_of) as sampler:
        for k in range(HOSTS):
            hosts.append(_start_host(
                k, tmp_path, pg_url, study_name, objective("fast.py:paced"), n_trials,
            ))  # fmt: skip
            roots[hosts[-1].name] = hosts[-1].proc.pid
        codes = {h.name: _wait(h) for h in hosts}
    seen = sampler.result
    errors = private_pg.connection_errors(p for h in hosts for p in h.output_files())

    trials = _trials(pg_url, study_name)
    finished = [t for t in trials if t.state.is_finished()]
    assert (len(trials), len(finished)) == (n_trials, n_trials), {
        s.name: sum(t.state == s for t in trials) for s in TrialState
    }
    assert not _unfinished(trials)
    report = f"exit codes {codes}; connections {seen.as_dict()}; errors {errors[:3]}"
    assert codes == {h.name: 0 for h in hosts}, report
    assert not errors, report
    assert seen.samples > 0 and not seen.errors
    # Only the hosts are on the study's database (the sampler reads from `postgres`).
    assert seen.peak_total <= CONNECTIONS_PER_HOST * HOSTS, seen.as_dict()
    assert seen.peak_by_group, "no connection was traced to its host"
    assert max(seen.peak_by_group.values()) <= CONNECTIONS_PER_HOST, seen.peak_by_group
    assert seen.longest_idle_in_transaction_s <= 1.0, seen.as_dict()


# The scheduler's SIGTERM -> SIGKILL grace: too short for the supervisor's own shutdown (its
# trials are left RUNNING, for the others' reaper), and long enough for it (it ends them).
@pytest.mark.parametrize("grace_s", [0.2, 2.0], ids=["sigkill-mid-shutdown", "sigterm-handled"])
def test_a_host_killed_mid_trial_is_retried_by_the_hosts_still_running(
    tmp_path: Path, pg_url: str, study_name: str, hosts: list[Host], grace_s: float
) -> None:
    """SIGTERM to the victim's ``optguard run``, SIGKILL to its process group after a short
    grace: what it left RUNNING is reaped by the others' heartbeat (1 s, so 4 s), and every
    trial the kill ended is retried by them, not by a later run of the victim."""
    n_trials = 24
    _create_study(pg_url, study_name)
    flags = ("--heartbeat", "1s", "--kill-after", "1s")
    for k in range(HOSTS):
        hosts.append(_start_host(
            k, tmp_path, pg_url, study_name, objective("steady.py:objective"), n_trials, *flags,
        ))  # fmt: skip
    victim, others = hosts[0], hosts[1:]
    deadline = time.monotonic() + HOST_TIMEOUT_S
    while _running_on(pg_url, study_name, victim.name) < WORKERS:
        assert victim.proc.poll() is None, (victim.directory / "stderr.txt").read_text()
        assert time.monotonic() < deadline, f"{victim.name} never ran {WORKERS} trials at once"
        time.sleep(0.05)
    victim.proc.send_signal(signal.SIGTERM)
    time.sleep(grace_s)
    try:
        os.killpg(victim.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it was done within the grace
    victim.proc.wait()
    codes = {h.name: _wait(h) for h in others}
    assert codes == {h.name: 0 for h in others}, private_pg.connection_errors(
        p for h in others for p in h.output_files()
    )

    trials = _trials(pg_url, study_name)
    assert not _unfinished(trials)
    killed = [t for t in trials if str(t.user_attrs.get("optguard.worker", "")).startswith(
        f"{victim.name}:") and t.state != TrialState.COMPLETE]  # fmt: skip
    assert killed, "the victim was killed mid-trial"
    retried = {t.user_attrs["optguard.retry_of"]: t for t in trials
               if "optguard.retry_of" in t.user_attrs}  # fmt: skip
    missing = {t.number: (t.state.name, t.user_attrs.get("optguard.reason")) for t in killed
               if t.number not in retried}  # fmt: skip
    assert not missing, f"not retried by the hosts still running: {missing}"
    for t in killed:
        retry = retried[t.number]
        assert not str(retry.user_attrs.get("optguard.worker", "")).startswith(victim.name)
        assert retry.state.is_finished()
