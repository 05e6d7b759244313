"""Issue 13, part 2: the guard's evidence on a trial as Optuna artifacts (memory timeline as
CSV and SVG, the trial's log lines) and unit-clear attributes, read back through a real
optuna-dashboard's API, as a user opening the dashboard sees them."""

from __future__ import annotations

import csv
import os
import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import load_trials, objective, one_error_line, sqlite_url

from optguard.artifacts import artifact_dir
from optguard.config import resolve_options
from optguard.evidence import trial_log_lines
from optguard.timeline import Timeline, drop_spool, read_spool, spool_path, write_spool

EVIDENCE = objective("evidence.py:objective")  # #0 memory at a check, #1 stuck in C, #2 ok
MIXED = objective("outcomes.py:mixed")  # #0 complete, #1 pruned by the objective, #2 raises
NAMES = ("guard.log", "memory.csv", "memory.svg")


# -- the timeline: bounded, the peak kept -----------------------------------------------------


@pytest.mark.parametrize(
    ("capacity", "samples"),
    [(4, 3), (8, 1000), (256, 36_000)],  # 36 000 samples: an hour at the supervisor's 10 Hz
)
def test_timeline_is_bounded_spans_the_trial_and_keeps_the_peak(
    capacity: int, samples: int
) -> None:
    timeline = Timeline(capacity=capacity, interval_s=0.1)
    spike = samples // 2
    for i in range(samples):
        timeline.add(i * 0.1, 10**9 if i == spike else 1000 + i % 7)
    points = timeline.snapshot()
    assert len(points) <= capacity + 1  # the closed points and the open interval's peak
    assert (spike * 0.1, 10**9) in points
    times = [t for t, _ in points]
    assert times == sorted(times)
    assert times[-1] >= (samples - 1) * 0.1 - timeline.interval_s  # up to the last sample
    if samples > capacity * 10:  # downsampled: spread over the whole trial, not its start
        assert times[len(times) // 2] > samples * 0.1 / 4


def test_spool_is_read_only_for_its_own_trial(tmp_path: Path) -> None:
    path = spool_path(tmp_path / "logs" / "worker_s_h_0.log")
    assert path.parent.name.startswith(".")  # `grep logs/*` does not read it
    assert read_spool(path, 5, 12.5) == []  # none yet: a trial shorter than the spool interval
    write_spool(path, 5, 12.5, [(0.1, 100), (1.2, 200)])
    assert read_spool(path, 5, 12.5) == [(0.1, 100), (1.2, 200)]
    assert read_spool(path, 6, 14.0) == []  # the last trial's spool is not this one's
    # Review: a study recreated under the same name reuses trial ids; its stale spool must not
    # pass for the new trial's (it did, keyed by the id alone).
    assert read_spool(path, 5, 99.25) == []
    drop_spool(path)
    assert not path.exists()


def test_trial_log_lines_are_the_trials_own(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    log.write_text(
        "t INFO worker=0:1 trial=1 Trial #1 started\n"
        "t INFO worker=0:1 trial=10 Trial #10 started\n"
    )
    offset = log.stat().st_size
    with log.open("a") as fh:
        fh.write("t WARNING worker=0:1 trial=1 Trial #1 pruned: Trial timeout: 2.1s (limit 2s)\n")
        fh.write("t INFO worker=0:1 trial=- Worker exiting\n")
    assert trial_log_lines(log, 1) == [
        "t INFO worker=0:1 trial=1 Trial #1 started",
        "t WARNING worker=0:1 trial=1 Trial #1 pruned: Trial timeout: 2.1s (limit 2s)",
    ]
    assert trial_log_lines(log, 1, offset) == [
        "t WARNING worker=0:1 trial=1 Trial #1 pruned: Trial timeout: 2.1s (limit 2s)"
    ]
    assert trial_log_lines(tmp_path / "missing.log", 1) == []


# -- end to end: optguard run, then optuna-dashboard ------------------------------------------


def _run(tmp_path: Path, study: str, target: str, *extra: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "optguard", "run", "--study", study, "--objective", target,
         "--pruner", "none", "--workers", "1", *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Dashboard:
    """optuna-dashboard on the study's storage and artifact store, as the README starts it."""

    def __init__(self, tmp_path: Path, url: str, artifacts: Path) -> None:
        self.port = _free_port()
        self.log = (tmp_path / "dashboard.log").open("w")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "optuna-dashboard"), url,
             "--artifact-dir", str(artifacts),
             "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=tmp_path, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                self.get("/api/studies")
                return
            except (urllib.error.URLError, ConnectionError):
                assert self.proc.poll() is None, (tmp_path / "dashboard.log").read_text()
                assert time.monotonic() < deadline, "optuna-dashboard never answered"
                time.sleep(0.2)

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return bytes(r.read())

    def json(self, path: str) -> Any:
        return json.loads(self.get(path))

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
def dashboard_of() -> Any:
    started: list[_Dashboard] = []

    def start(tmp_path: Path, url: str, artifacts: Path) -> _Dashboard:
        started.append(_Dashboard(tmp_path, url, artifacts))
        return started[-1]

    yield start
    for dash in started:
        dash.close()


def _attrs(trial: dict[str, Any]) -> dict[str, str]:
    return {a["key"]: a["value"] for a in trial["user_attrs"]}


@pytest.mark.scenario
def test_guard_evidence_is_listed_in_optuna_dashboard(
    tmp_path: Path, study_name: str, dashboard_of: Any
) -> None:
    """#0 ends at a check over --max-rss (the worker attaches its evidence), #1 sits in C
    past --timeout and is killed (the supervisor attaches it), #2 completes (no evidence)."""
    _run(tmp_path, study_name, EVIDENCE, "--n-trials", "3", "--max-rss", "300MB",
         "--timeout", "2s", "--grace", "0.5s", "--kill-after", "1s")  # fmt: skip
    store = tmp_path / "optguard-artifacts"  # the default: beside optguard.db
    assert store.is_dir()
    dash = dashboard_of(tmp_path, sqlite_url(tmp_path), store)
    (summary,) = dash.json("/api/studies")["study_summaries"]
    study_id = summary["study_id"]
    trials = {t["number"]: t for t in dash.json(f"/api/studies/{study_id}?after=0")["trials"]}
    assert [trials[n]["state"] for n in range(3)] == ["Pruned", "Pruned", "Complete"]

    def artifact(n: int, suffix: str) -> bytes:
        (meta,) = [a for a in trials[n]["artifacts"] if a["filename"] == f"trial-{n}-{suffix}"]
        return dash.get(f"/artifacts/{study_id}/{trials[n]['trial_id']}/{meta['artifact_id']}")

    for n in (0, 1):
        assert sorted(a["filename"] for a in trials[n]["artifacts"]) == [
            f"trial-{n}-{name}" for name in NAMES
        ]
    assert trials[2]["artifacts"] == []  # by default only the trials the guard ended

    memory = _attrs(trials[0])
    assert memory["optguard.reason"] == "memory" and memory["optguard.pruned_by"] == "guard"
    assert float(memory["optguard.limit_bytes"]) == 300e6
    assert float(memory["optguard.peak_mb"]) > 300
    rows = list(csv.DictReader(io.StringIO(artifact(0, "memory.csv").decode())))
    assert max(float(r["memory_mb"]) for r in rows) > 300  # the sample over the limit is in
    assert "Memory limit exceeded:" in artifact(0, "guard.log").decode()
    svg = artifact(0, "memory.svg").decode()
    assert svg.startswith("<svg") and "limit: --max-rss 300MB" in svg

    stuck = _attrs(trials[1])
    assert stuck["optguard.reason"] == "timeout" and stuck["optguard.hard_kill"] == "True"
    assert float(stuck["optguard.limit_s"]) == 2.0
    log = artifact(1, "guard.log").decode()
    assert "Trial timeout:" in log and "killing worker" in log and "marked PRUNED" in log
    rows = list(csv.DictReader(io.StringIO(artifact(1, "memory.csv").decode())))
    assert float(rows[-1]["elapsed_s"]) > 2.0  # sampled past the timeout, until the kill
    assert "limit: --timeout 2s" in artifact(1, "memory.svg").decode()


@pytest.mark.scenario
def test_artifacts_all_and_none(tmp_path: Path, study_name: str) -> None:
    """``--artifacts-all``: every trial has its evidence, and a trial the pruner (here the
    objective) ended says so; ``--artifacts none``: no store, no artifact."""
    store = tmp_path / "store"
    _run(tmp_path, study_name, MIXED, "--n-trials", "3", "--artifacts", str(store),
         "--artifacts-all", "--fail-fast", "0")  # fmt: skip
    url = sqlite_url(tmp_path)
    storage = optuna.storages.RDBStorage(url)
    for trial in load_trials(url, study_name):
        names = [m.filename for m in optuna.artifacts.get_all_artifact_meta(trial, storage=storage)]
        assert f"trial-{trial.number}-guard.log" in names, (trial.number, names)
        for meta in optuna.artifacts.get_all_artifact_meta(trial, storage=storage):
            assert (store / meta.artifact_id).is_file()
    pruned = [t for t in load_trials(url, study_name) if t.state.name == "PRUNED"]
    assert [t.user_attrs["optguard.pruned_by"] for t in pruned] == ["pruner"]

    other = f"{study_name}-none"
    _run(tmp_path, other, MIXED, "--n-trials", "3", "--artifacts", "none", "--fail-fast", "0")
    assert not (tmp_path / "optguard-artifacts").exists()
    for trial in load_trials(url, other):
        assert optuna.artifacts.get_all_artifact_meta(trial, storage=storage) == []


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--artifacts", "/proc/optguard-store"], "--artifacts /proc/optguard-store: cannot"),
        (["--checkpoint-store", "artifacts", "--artifacts", "none"],
         "--checkpoint-store artifacts needs an artifact store, but --artifacts is none"),
        (["--checkpoint-store", "s3"], "--checkpoint-store must be one of local, artifacts"),
        (["--artifacts", "none", "--artifacts-all"],
         "--artifacts-all needs an artifact store, but --artifacts is none"),
    ],
)  # fmt: skip
def test_bad_artifact_flags_are_refused_before_the_storage(
    tmp_path: Path, flags: list[str], error: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "optguard", "run", "--study", "s", "--objective", MIXED,
         "--n-trials", "1", *flags],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert error in one_error_line(result)
    assert not (tmp_path / "optguard.db").exists()
    assert not (tmp_path / "optguard-artifacts").exists()


def test_checkpoint_store_artifacts_uses_the_default_store() -> None:
    """Review: ``--checkpoint-store artifacts`` without ``--artifacts`` was refused as if the
    store were ``none`` (``str(None)``); the default store beside the storage is meant."""
    opts = resolve_options({"study": "s", "objective": MIXED, "checkpoint_store": "artifacts"})
    assert opts.checkpoint_store == "artifacts" and opts.artifacts is None
    assert artifact_dir("sqlite:////data/optguard.db", opts.artifacts) == Path(
        "/data/optguard-artifacts"
    )


# -- review: the evidence path must cost the evidence only, never a worker or a trial ----------

FAULTS = "evidence_faults.py"


def _states(url: str, study: str) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(t.state.name for t in load_trials(url, study)))


@pytest.mark.scenario
def test_a_trial_reaped_meanwhile_does_not_kill_the_worker(
    tmp_path: Path, study_name: str
) -> None:
    """Review: with --artifacts-all the evidence write of a trial another host had reaped
    raised UpdateFinishedTrialError and killed the worker (3 deaths in 3 trials)."""
    url = sqlite_url(tmp_path)
    env = {**os.environ, "REAP_URL": url}
    proc = subprocess.run(
        [sys.executable, "-m", "optguard", "run", "--study", study_name, "--objective",
         objective(f"{FAULTS}:reaped"), "--n-trials", "3", "--workers", "1", "--artifacts-all",
         "--fail-fast", "0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert "0 worker death(s)" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode != 0 or _states(url, study_name) == {"FAIL": 3}
    assert _states(url, study_name).get("RUNNING", 0) == 0
    log = "".join(p.read_text() for p in (tmp_path / "logs").glob("worker_*.log"))
    assert log.count("was already finished by another host") == 3, log


@pytest.mark.scenario
def test_an_unwritable_store_leaves_no_record_of_a_missing_file(
    tmp_path: Path, study_name: str
) -> None:
    """Review: Optuna's upload_artifact records before it writes; with a store that could
    not be written every trial kept records of files that do not exist."""
    store = tmp_path / "store"
    _run(tmp_path, study_name, objective(f"{FAULTS}:breaks_the_store"), "--n-trials", "3",
         "--artifacts", str(store), "--artifacts-all")  # fmt: skip
    url = sqlite_url(tmp_path)
    storage = optuna.storages.RDBStorage(url)
    trials = load_trials(url, study_name)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    records = {t.number: optuna.artifacts.get_all_artifact_meta(t, storage=storage) for t in trials}
    assert records[0] and not records[1] and not records[2], records
    log = "".join(p.read_text() for p in (tmp_path / "logs").glob("worker_*.log"))
    assert "evidence not stored" in log


@pytest.mark.scenario
def test_evidence_in_a_c_locale(tmp_path: Path, study_name: str) -> None:
    """Review: the evidence was written in the locale's encoding; under LC_ALL=C a non-ASCII
    error message crashed the worker and the supervisor and left the trial RUNNING."""
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "optguard", "run", "--study", study_name, "--objective",
         objective(f"{FAULTS}:non_ascii_error"), "--n-trials", "2", "--workers", "1",
         "--artifacts-all", "--fail-fast", "0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    url = sqlite_url(tmp_path)
    assert _states(url, study_name) == {"FAIL": 2}, proc.stdout + proc.stderr
    assert "internal error" not in proc.stdout + proc.stderr
    storage = optuna.storages.RDBStorage(url)
    trial = load_trials(url, study_name)[0]
    (meta,) = [m for m in optuna.artifacts.get_all_artifact_meta(trial, storage=storage)
               if m.filename.endswith("guard.log")]  # fmt: skip
    text = (tmp_path / "optguard-artifacts" / meta.artifact_id).read_bytes().decode("utf-8")
    assert "température" in text
