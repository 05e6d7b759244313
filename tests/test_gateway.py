"""The supervisor's gateway: a host's workers reach a database server through it, on two
connections whatever ``--workers`` is (``optguard.gateway``). Real PostgreSQL, real socket
pairs, real signals."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import optuna
import psutil
import pytest
import sqlalchemy
import sqlalchemy.event
from conftest import PG_URL
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._cached_storage import _CachedStorage
from optuna.trial import TrialState
from test_storage import _Proxy, _worker_handlers

from optguard import proctree
from optguard.errors import StorageError
from optguard.gateway.client import GatewaySlots, take_gateway
from optguard.gateway.protocol import FD_ENV
from optguard.gateway.server import Gateway, Served
from optguard.guard import GuardPruned
from optguard.storage import TrialSlots, _take_server_lock, open_storage, set_closing_attrs
from optguard.supervision.supervisor import _Supervisor
from optguard.supervision.workers import Worker

PG_PORT = sqlalchemy.engine.make_url(PG_URL).port or 5432


def _client(gateway: Gateway) -> Any:
    """A worker's storage, as ``optguard worker`` takes it from its environment."""
    theirs, _ = gateway.connect("test")
    os.environ[FD_ENV] = str(theirs.detach())
    client = take_gateway()
    assert client is not None and FD_ENV not in os.environ
    return client


@pytest.fixture
def served(pg_study: str) -> Iterator[tuple[Any, Any, Gateway]]:
    """``(supervisor's storage, worker's storage, gateway)`` on a fresh study."""
    storage = open_storage(PG_URL, create_schema=True, gateway=True)
    optuna.create_study(study_name=pg_study, storage=storage)
    slots = TrialSlots(storage, pg_study)
    gateway = Gateway(slots)
    client = _client(gateway)
    try:
        yield storage, client, gateway
    finally:
        client.close()
        slots.close()
        storage.engine.dispose()


def test_threads_take_turns_on_the_supervisors_two_pooled_connections(pg_study: str) -> None:
    storage = open_storage(PG_URL, create_schema=True, gateway=True)
    study = optuna.create_study(study_name=pg_study, storage=storage)
    study.enqueue_trial({"x": 1.0})
    connects: list[int] = []
    out = {"now": 0, "most": 0}
    lock = threading.Lock()

    def checkout(*_: object) -> None:
        with lock:
            out["now"] += 1
            out["most"] = max(out["most"], out["now"])

    def checkin(*_: object) -> None:
        with lock:
            out["now"] -= 1

    sqlalchemy.event.listen(storage.engine, "connect", lambda *_: connects.append(1))
    sqlalchemy.event.listen(storage.engine.pool, "checkout", checkout)
    sqlalchemy.event.listen(storage.engine.pool, "checkin", checkin)

    def busy() -> None:
        for _ in range(15):
            storage.get_all_trials(study._study_id, deepcopy=False)
            storage.get_study_user_attrs(study._study_id)

    threads = [threading.Thread(target=busy) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert out["most"] == 2  # eight threads, two connections out at a time
        assert len(connects) <= 2  # the two kept since the schema check, or new ones
    finally:
        storage.engine.dispose()


def test_a_worker_gets_through_the_gateway_what_its_own_storage_gives(
    served: tuple[Any, Any, Gateway], pg_study: str
) -> None:
    storage, client, _ = served
    study = optuna.load_study(study_name=pg_study, storage=_CachedStorage(client))
    slots = GatewaySlots(client, pg_study)
    owner = {"optguard.worker": "h:1:2:0"}
    claimed = [slots.claim(study, 3, owner) for _ in range(4)]
    assert [t.number for t in claimed[:3] if t is not None] == [0, 1, 2] and claimed[3] is None
    assert slots.count_trials() == 3
    trial = claimed[0]
    assert trial is not None
    x = trial.suggest_float("x", 0, 1)
    trial.report(0.5, 0)
    set_closing_attrs(client, trial._trial_id, {"optguard.peak_mb": 12.5})
    study.tell(trial, x)
    stored = storage.get_trial(trial._trial_id)
    assert stored.state == TrialState.COMPLETE and stored.params == {"x": x}
    assert stored.user_attrs == {**owner, "optguard.peak_mb": 12.5}
    assert stored.intermediate_values == {0: 0.5}
    # Optuna's own errors come back as themselves
    with pytest.raises(UpdateFinishedTrialError):
        client.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    with pytest.raises(KeyError):
        client.get_study_id_from_name(pg_study + "-none")
    with pytest.raises(ValueError, match="not a storage call"):
        client.call("engine")
    # an enqueued trial is popped after the total, as the worker's own claim does
    study.enqueue_trial({"x": 0.25})
    retry = slots.claim(study, 3, owner)
    assert retry is not None and retry.number == 3 and retry.suggest_float("x", 0, 1) == 0.25
    # the sampler's reads through Optuna's cache see everything
    assert len(study.get_trials(deepcopy=False)) == 4


def test_a_worker_whose_supervisor_is_gone_gets_a_storage_error(
    pg_study: str,
) -> None:
    server, theirs = socket.socketpair()
    os.environ[FD_ENV] = str(theirs.detach())
    client = take_gateway()
    server.close()
    with pytest.raises(StorageError, match="supervisor serving this worker's storage is gone"):
        client.get_study_id_from_name(pg_study)
    client.close()


def test_an_interrupt_gives_up_a_gateway_call_waiting_out_an_outage(pg_study: str) -> None:
    """As in the worker's own storage (``test_storage``): an interrupt is not held for the
    whole outage, and the call it gave up is not made once the storage is back."""
    proxy = _Proxy(("127.0.0.1", PG_PORT))
    url = str(sqlalchemy.engine.make_url(PG_URL).set(host="127.0.0.1", port=proxy.port))
    storage = open_storage(url, create_schema=True, outage_s=60, gateway=True)
    optuna.create_study(study_name=pg_study, storage=storage)
    slots = TrialSlots(storage, pg_study)
    client = _client(Gateway(slots))
    study = optuna.load_study(study_name=pg_study, storage=_CachedStorage(client))
    trial = GatewaySlots(client, pg_study).claim(study, None, {"optguard.worker": "h:1:2:0"})
    assert trial is not None
    proxy.cut()
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with _worker_handlers(trial), pytest.raises(GuardPruned) as raised:
            client.set_trial_intermediate_value(trial._trial_id, 0, 1.0)  # as trial.report
        assert proxy.down  # raised during the outage
        assert raised.value.violation.reason == "interrupted"
        proxy.restore()
        time.sleep(4)  # past the backoff: a call still retried would have been made by now
        assert client.get_trial(trial._trial_id).intermediate_values == {}
    finally:
        timer.cancel()
        client.close()
        slots.close()
        storage.engine.dispose()


def _db_connections(root: psutil.Process) -> dict[int, int]:
    """Connections to the PostgreSQL port held by ``root``'s process tree: pid -> count."""
    held: dict[int, int] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue  # exited meanwhile
        count = sum(1 for c in conns if c.raddr and c.raddr.port == PG_PORT)
        if count:
            held[proc.pid] = count
    return held


def _idle_in_transaction(ports: set[int]) -> list[float]:
    """How long each of these client ports' sessions has been idle inside a transaction."""
    engine = sqlalchemy.create_engine(PG_URL, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sqlalchemy.text(
                    "SELECT client_port, extract(epoch FROM now() - state_change) "
                    "FROM pg_stat_activity WHERE state = 'idle in transaction'"
                )
            ).all()
    finally:
        engine.dispose()
    return [float(age) for port, age in rows if port in ports]


@pytest.mark.scenario
@pytest.mark.parametrize("gateway", ["--gateway", "--no-gateway"])
def test_a_host_of_four_workers_holds_two_connections_and_none_idle_in_a_transaction(
    tmp_path: Path, pg_study: str, gateway: str
) -> None:
    """--no-gateway (trials of milliseconds, connections to spare): each worker its own."""
    (tmp_path / "obj.py").write_text(
        "import time\n\ndef objective(trial):\n"
        "    x = trial.suggest_float('x', -1, 1)\n    time.sleep(0.2)\n    return x * x\n"
    )
    run = subprocess.Popen(
        [sys.executable, "-m", "optguard", "run", "--study", pg_study, "--workers", "4",
         "--objective", f"{tmp_path / 'obj.py'}:objective", "--n-trials", "40",
         "--storage", PG_URL, gateway],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    root = psutil.Process(run.pid)
    most, by_workers, idle_ages, samples = 0, 0, [], 0
    while run.poll() is None:
        held = _db_connections(root)
        most = max(most, sum(held.values()))
        by_workers = max(by_workers, sum(n for pid, n in held.items() if pid != run.pid))
        ports = set()
        for proc in [root, *root.children(recursive=True)]:
            try:
                ports |= {c.laddr.port for c in proc.net_connections(kind="tcp")}
            except psutil.Error:
                continue
        idle_ages += _idle_in_transaction(ports)
        samples += 1
        time.sleep(0.05)
    out, err = run.communicate()
    assert run.returncode == 0, err
    assert samples > 10  # it was watched while it ran
    if gateway == "--gateway":
        assert most == 2 and by_workers == 0, (most, by_workers)
    else:
        assert by_workers >= 4, (most, by_workers)  # at least one each, at some moment
    assert all(age < 1.0 for age in idle_ages), idle_ages
    trials = optuna.load_study(study_name=pg_study, storage=PG_URL).trials
    assert len(trials) == 40 and {t.state for t in trials} == {TrialState.COMPLETE}


def test_claims_from_many_threads_ride_out_an_outage_on_the_one_lock_connection(
    pg_study: str,
) -> None:
    """The suite once saw "[Errno 9] Bad file descriptor" end a run after a PostgreSQL
    restart: a gateway thread whose claim failed dropped the lock's connection while another
    thread held the lock on it. Eight threads claim through one ``TrialSlots`` across a cut."""
    proxy = _Proxy(("127.0.0.1", PG_PORT))
    url = str(sqlalchemy.engine.make_url(PG_URL).set(host="127.0.0.1", port=proxy.port))
    storage = open_storage(url, create_schema=True, outage_s=60, gateway=True)
    optuna.create_study(study_name=pg_study, storage=storage)
    slots = TrialSlots(storage, pg_study)
    errors: list[BaseException] = []
    claimed: list[int] = []

    def claim(index: int) -> None:
        try:
            while (row := slots.claim_row(40, {"optguard.worker": f"h:{index}"})) is not None:
                claimed.append(row[0])
                storage.set_trial_state_values(row[0], TrialState.COMPLETE, [1.0])
        except BaseException as exc:  # deliberately broad: the test reports whatever it was
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    try:
        while len(claimed) < 8:
            time.sleep(0.01)
        proxy.cut()
        time.sleep(1.5)
        proxy.restore()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        assert len(claimed) == len(set(claimed)) == 40
        states = [t.state for t in storage.get_all_trials(slots.study_id, deepcopy=False)]
        assert states == [TrialState.COMPLETE] * 40
    finally:
        slots.close()
        storage.engine.dispose()


def test_the_hosts_copy_of_the_trials_answers_as_the_database_reading_only_what_changed(
    tmp_path: Path,
) -> None:
    """Workers joining a big study are sent what their Optuna cache lacks from the host's
    one copy (``optguard.gateway.cache``): the database is read once, then for changes."""
    from optguard.gateway.cache import TrialCache

    storage = open_storage(f"sqlite:///{tmp_path / 'c.db'}", create_schema=True)
    study = optuna.create_study(study_name="c", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=50)
    running = [study.ask() for _ in range(2)]
    read: list[int] = []
    direct = storage._get_trials

    def counted(*args: Any, **kwargs: Any) -> list[Any]:
        rows = direct(*args, **kwargs)
        read.append(len(rows))
        return rows

    storage._get_trials = counted  # type: ignore[method-assign]
    cache = TrialCache(storage, study._study_id)

    def same(included: set[int], above: int) -> None:
        got = cache.get_trials(study._study_id, None, included, above)
        want = direct(study._study_id, None, included, above)
        assert [(t._trial_id, t.state, t.values) for t in got] == [
            (t._trial_id, t.state, t.values) for t in want
        ]

    same(set(), -1)  # a worker's first ask: the whole study
    same(set(), -1)  # the next worker's: only the two running trials are read again
    assert read == [52, 2]
    study.tell(running[0], 0.5)
    for _ in range(3):
        study.tell(study.ask(), 0.25)
    ids = sorted(t._trial_id for t in study.get_trials(deepcopy=False))
    read.clear()  # (the test's own study read through it too)
    same({running[1]._trial_id}, ids[-4])  # as a worker's cache asks after the changes
    assert read == [5]  # the two that were running, and the three new



def _unreadable() -> None:
    raise ModuleNotFoundError("No module named 'the_objectives_module'")


class _Unreadable:
    """A value the supervisor cannot unpickle, as a class of the objective's own module."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _unreadable, ()


def test_a_value_the_supervisor_cannot_read_fails_that_call_not_the_worker(
    served: tuple[Any, Any, Gateway], pg_study: str
) -> None:
    """Review: the serving thread died on it, and the run ended with exit 3; a worker with
    its own storage fails only that trial (Optuna's JSON refuses the value)."""
    _, client, _ = served
    study = optuna.load_study(study_name=pg_study, storage=_CachedStorage(client))
    trial = GatewaySlots(client, pg_study).claim(study, None, {"optguard.worker": "h:1:2:0"})
    assert trial is not None
    with pytest.raises(TypeError, match="the supervisor cannot read"):
        client.set_trial_user_attr(trial._trial_id, "note", _Unreadable())
    client.set_trial_user_attr(trial._trial_id, "note", "fine")  # the channel still works
    assert client.get_trial(trial._trial_id).user_attrs["note"] == "fine"


class _SlowSecondAttempt:
    """A storage whose call fails once as in an outage, then takes 1 s and succeeds."""

    def __init__(self) -> None:
        from optguard.outage import Outage

        self.outage = Outage("postgresql://fake/db", 30)
        self.done: list[tuple[int, float]] = []
        self.attempts = 0

    def set_trial_intermediate_value(self, trial_id: int, step: int, value: float) -> None:
        def attempt() -> None:
            self.attempts += 1
            if self.attempts == 1:
                raise sqlalchemy.exc.OperationalError(
                    "UPDATE", None, Exception("server closed the connection unexpectedly")
                )
            time.sleep(1.0)
            self.done.append((step, value))

        self.outage.call(attempt)

    def get_study_id_from_name(self, name: str) -> int:
        return 7


class _FakeSlots:
    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.study_id = 7

    def claim_row(self, *_: Any) -> None:
        return None

    def count_trials(self) -> int:
        return 0


def test_an_interrupt_during_an_attempt_waits_for_its_answer_then_is_raised(
    study_name: str,
) -> None:
    """Review: the worker raised at once and the attempt committed after it: a call left
    half known. Now the worker hears how the call ended, then raises its interrupt."""
    storage = _SlowSecondAttempt()
    client = _client(Gateway(_FakeSlots(storage)))  # type: ignore[arg-type]
    real = optuna.create_study(study_name=study_name)  # only for the handlers' trial
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))  # in attempt 2
    timer.start()
    try:
        with _worker_handlers(real.ask()), pytest.raises(GuardPruned):
            client.set_trial_intermediate_value(1, 0, 2.0)
        assert storage.done == [(0, 2.0)]  # the attempt under way finished first
        assert client.get_study_id_from_name("any") == 7  # answers still match their calls
    finally:
        timer.cancel()
        client.close()


def test_a_forked_child_of_the_worker_does_not_hold_the_supervisors_socket(
    served: tuple[Any, Any, Gateway], pg_study: str
) -> None:
    """Review: a forked child (a data loader's worker) kept the gateway's socket: the
    serving thread outlived the worker, and the child's calls would cross the worker's."""
    _, client, _ = served
    fd = client._conn.fileno()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its copy of the socket is closed, its calls refused
        try:
            os.fstat(fd)
            verdict = b"held"
        except OSError:
            try:
                client.get_study_id_from_name(pg_study)
                verdict = b"served"
            except StorageError:
                verdict = b"closed"
        os.write(write, verdict)
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 16) == b"closed"
    os.close(read)
    assert client.get_study_id_from_name(pg_study) >= 0  # the worker's own still works


def test_a_claim_whose_worker_died_while_it_waited_is_given_back(pg_study: str) -> None:
    """Review: a worker SIGKILLed while its claim waited for the study-wide lock (another
    host held it): the supervisor judged the dead worker (nothing RUNNING yet), then the
    claim created a RUNNING trial for the dead process. Now the supervisor does not wait
    for a claim, and the gateway gives the trial back (WAITING, no owner): the next claim
    runs it under its number."""
    storage = open_storage(PG_URL, create_schema=True, gateway=True)
    optuna.create_study(study_name=pg_study, storage=storage)
    slots = TrialSlots(storage, pg_study)
    gateway = Gateway(slots)
    other = sqlalchemy.create_engine(PG_URL, poolclass=sqlalchemy.pool.NullPool).connect()
    release = _take_server_lock(other, f"optguard:{pg_study}")  # another host's claim
    theirs, thread = gateway.connect("dying")
    worker = Connection(theirs.detach())
    owner = {"optguard.worker": "elsewhere:999999:w0"}
    try:
        worker.send((1, pickle.dumps(("claim", (4, owner), {}))))
        deadline = time.monotonic() + 10
        while thread.call != "claim" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert thread.call == "claim"  # what Worker.claiming reads: not judged meanwhile
        worker.close()  # SIGKILLed meanwhile
        time.sleep(0.3)
        assert thread.is_alive()  # still waiting for the lock
        other.execute(release)
        other.commit()
        thread.join(10)
        assert not thread.is_alive()
        trials = storage.get_all_trials(slots.study_id)
        assert [(t.number, t.state, t.user_attrs) for t in trials] == [(0, TrialState.WAITING, {})]
        claimed = slots.claim_row(4, {"optguard.worker": "here:1:w0"})
        assert claimed is not None and claimed[0] == trials[0]._trial_id
        again = storage.get_trial(claimed[0])
        assert again.state == TrialState.RUNNING and again.number == 0
        assert again.user_attrs == {"optguard.worker": "here:1:w0"}
        assert len(storage.get_all_trials(slots.study_id)) == 1
    finally:
        other.close()
        slots.close()
        storage.engine.dispose()


def test_a_claimed_trial_already_judged_is_not_given_back(pg_study: str) -> None:
    """The other order: the supervisor recorded the dead worker's trial first; giving it
    back then changes nothing."""
    storage = open_storage(PG_URL, create_schema=True, gateway=True)
    optuna.create_study(study_name=pg_study, storage=storage)
    slots = TrialSlots(storage, pg_study)
    try:
        owner = {"optguard.worker": "elsewhere:999999:w0"}
        claimed = slots.claim_row(None, owner)
        assert claimed is not None
        storage.set_trial_state_values(claimed[0], TrialState.FAIL)
        assert not slots.give_back(claimed[0], owner)
        trial = storage.get_trial(claimed[0])
        assert trial.state == TrialState.FAIL and trial.user_attrs == owner
    finally:
        slots.close()
        storage.engine.dispose()


@pytest.mark.parametrize(
    ("call", "judged", "waits", "claiming"),
    [
        ("set_trial_state_values", True, True, False),  # a tell under way: judged after it
        ("set_trial_state_values", False, False, False),  # storage gone for good: no judging
        ("claim", True, True, True),  # not judged at all until it ended (reap_worker)
    ],
)
def test_a_dead_workers_call_is_waited_for_only_when_its_trial_is_judged_after_it(
    tmp_path: Path, call: str, judged: bool, waits: bool, claiming: bool
) -> None:
    release = threading.Event()

    def serve(thread: Served) -> None:
        thread.call = call
        release.wait(5)

    thread = Served(serve, "stuck")
    thread.start()
    while thread.call is None:
        time.sleep(0.005)
    status_read, status_write = os.pipe()
    control_read, control_write = os.pipe()
    worker = Worker(
        index=0, uid="0.1", proc=None, log=None, log_path=tmp_path / "w.log",  # type: ignore[arg-type]
        out=(tmp_path / "out").open("wb"), status=SimpleNamespace(fd=status_read),  # type: ignore[arg-type]
        control_fd=control_write, spawned_at=0.0, served=thread,
    )  # fmt: skip
    assert worker.claiming() is claiming
    timer = threading.Timer(0.5, release.set)
    timer.start()
    try:
        worker.close(judged=judged)
        assert thread.is_alive() is not waits  # waited for: the call had ended by then
    finally:
        timer.cancel()
        release.set()
        thread.join(5)
        os.close(status_write)
        os.close(control_read)
    assert not worker.claiming()  # the thread ended


def test_a_dead_worker_is_not_judged_while_a_claim_of_its_own_runs() -> None:
    """Review: the supervisor judged a dead worker while the gateway still ran its claim;
    its judge could read the trial RUNNING, the gateway give it back, another worker claim
    it, and the judge then record that worker's trial as the dead one's. The dead worker
    is reaped only once its claim has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    while not proctree.has_exited(proc.pid):
        time.sleep(0.01)
    judged: list[int] = []
    supervisor = SimpleNamespace(oom_seen=0, on_exit=lambda w, code, *_: judged.append(code))
    worker = SimpleNamespace(proc=proc, claiming=lambda: True)
    assert _Supervisor.reap_worker(supervisor, worker) is None  # type: ignore[arg-type]
    assert judged == [] and proctree.has_exited(proc.pid)  # not reaped yet: asked again
    worker.claiming = lambda: False
    assert _Supervisor.reap_worker(supervisor, worker) == 0  # type: ignore[arg-type]
    assert judged == [0]


def test_a_give_back_repeated_after_another_worker_claimed_the_trial_leaves_it(
    pg_study: str,
) -> None:
    """Review: a give-back whose reply was lost in an outage is tried again; by then
    another worker may have claimed the trial, which it must keep."""
    storage = open_storage(PG_URL, create_schema=True, gateway=True)
    optuna.create_study(study_name=pg_study, storage=storage)
    slots = TrialSlots(storage, pg_study)
    dead, live = {"optguard.worker": "h:1:w0.1"}, {"optguard.worker": "h:2:w1.1"}
    try:
        claimed = slots.claim_row(4, dead)
        assert claimed is not None
        assert slots.give_back(claimed[0], dead)
        assert slots.claim_row(4, live) == (claimed[0], None)
        assert not slots.give_back(claimed[0], dead)  # the repeated attempt
        trial = storage.get_trial(claimed[0])
        assert trial.state == TrialState.RUNNING and trial.user_attrs == live
    finally:
        slots.close()
        storage.engine.dispose()


HANG_FIRST = """
import time


def objective(trial):
    x = trial.suggest_float("x", 0, 1)
    if trial.number == 0:
        time.sleep(3600)
    time.sleep(0.05)
    return x
"""


@pytest.mark.scenario
def test_a_worker_call_held_by_the_database_does_not_hold_the_enforcement(
    tmp_path: Path, pg_study: str
) -> None:
    """Review: the loop read the study's requests on the one connection, behind a worker's
    claim that waited on a row lock: a trial past --timeout went on until the lock was
    released. The periodic storage work now has a thread of its own (``Poller``)."""
    import datetime

    (tmp_path / "obj.py").write_text(HANG_FIRST)
    run = subprocess.Popen(
        [sys.executable, "-m", "optguard", "run", "--study", pg_study, "--workers", "2",
         "--objective", f"{tmp_path / 'obj.py'}:objective", "--n-trials", "400",
         "--timeout", "2", "--grace", "1", "--storage", PG_URL],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    engine = sqlalchemy.create_engine(PG_URL, poolclass=sqlalchemy.pool.NullPool)
    try:
        deadline = time.monotonic() + 60
        while True:  # trial 0 hangs on one worker, the other has finished a trial
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            try:
                states = [t.state for t in optuna.load_study(
                    study_name=pg_study, storage=PG_URL).get_trials(deepcopy=False)]
            except KeyError:
                states = []
            if states[:1] == [TrialState.RUNNING] and TrialState.COMPLETE in states:
                break
            time.sleep(0.1)
        with engine.connect() as conn:  # the next claim waits on the study row
            conn.execute(
                sqlalchemy.text(
                    "SELECT 1 FROM studies WHERE study_name = :s FOR UPDATE"
                ).bindparams(s=pg_study)
            )
            time.sleep(8)
            released = datetime.datetime.now()
            conn.rollback()
        time.sleep(1)
        run.send_signal(signal.SIGINT)
        run.send_signal(signal.SIGINT)
        run.communicate(timeout=60)
    finally:
        engine.dispose()
        if run.poll() is None:
            run.kill()
            run.communicate()
    lines = [
        line for log in (tmp_path / "logs").glob("worker_*.log")
        for line in log.read_text().splitlines() if "trial=0 " in line and "Trial timeout" in line
    ]  # fmt: skip
    assert lines, "trial 0 was never timed out"
    stamp = datetime.datetime.strptime(lines[0][:23], "%Y-%m-%d %H:%M:%S,%f")
    assert stamp < released, (lines[0], released)  # enforced while the lock was held


@pytest.mark.scenario
@pytest.mark.parametrize("action", ["stop", "cancel"])
def test_stop_and_cancel_reach_two_hosts_through_their_gateways(
    tmp_path: Path, pg_study: str, action: str
) -> None:
    """The request is read by each supervisor's poller (its periodic storage work): every
    host stops taking trials, and after a cancel nothing is RUNNING anywhere."""
    from conftest import objective, run_cli

    # a cancel cuts trials that never end on their own; a stop lets 2-second ones finish
    target = "steady.py:objective" if action == "stop" else "sleepy.py:objective"
    hosts = []
    for name in ("gw-host-a", "gw-host-b"):
        (tmp_path / name).mkdir()
        hosts.append(subprocess.Popen(
            ["unshare", "-u", "sh", "-c", f'hostname {name} && exec "$@"', "sh",
             sys.executable, "-m", "optguard", "run", "--study", pg_study, "--workers", "2",
             "--objective", objective(target), "--n-trials", "60",
             "--pruner", "none", "--storage", PG_URL],
            cwd=tmp_path / name, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:  # both hosts run trials
            logs = [p.read_text() for h in ("gw-host-a", "gw-host-b")
                    for p in (tmp_path / h / "logs").glob("worker_*.log")]  # fmt: skip
            if sum(" started\n" in text for text in logs) >= 4:
                break
            assert time.monotonic() < deadline and all(h.poll() is None for h in hosts)
            time.sleep(0.1)
        asked = run_cli(action, "--study", pg_study, "--storage", PG_URL, cwd=tmp_path)
        assert asked.returncode == 0, asked.stderr
        for host in hosts:
            _, err = host.communicate(timeout=60)
            assert host.returncode == 130, err
    finally:
        for host in hosts:
            if host.poll() is None:
                host.kill()
                host.communicate()
    trials = optuna.load_study(study_name=pg_study, storage=PG_URL).get_trials(deepcopy=False)
    assert 4 <= len(trials) < 60
    states = {t.state for t in trials}
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    if action == "stop":  # running trials finished
        assert states == {TrialState.COMPLETE}
    else:
        assert {t.user_attrs.get("optguard.reason") for t in trials} == {"cancelled"}
