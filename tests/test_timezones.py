"""Durations from the storage are right whatever the host's timezone (issue 12, part 7).

Optuna 5 stores RDB timestamps as naive UTC and hands them out as naive local time; Optuna 4.x
stored naive local time. Every duration optguard takes from the storage is the difference of
two timestamps of one trial (report, patience's order), or a trial's start against a
process's start time (whether a RUNNING trial's owner is the process that started it, when a
restart reaps). Each is checked here with the processes in ``America/New_York`` (UTC-5/-4)
against ``UTC``.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from conftest import run_cli, sqlite_url

ZONES = ("UTC", "America/New_York")
START = datetime(2026, 7, 1, 12, 0, 0)  # UTC, in summer: New York is UTC-4


def _durations(tmp_path: Path, tz: str) -> dict[int, float]:
    result = run_cli("report", "--study", "tz", "--json", cwd=tmp_path, env={"TZ": tz})
    assert result.returncode == 0, result.stderr
    return {p["trial"]: p["duration_s"] for p in json.loads(result.stdout)["points"]}


def _study(tmp_path: Path, spans: tuple[tuple[datetime, float], ...] = ()) -> optuna.Study:
    """Trials of 90 s and 6 s in summer, plus ``spans`` (start in UTC, seconds)."""
    study = optuna.create_study(study_name="tz", storage=sqlite_url(tmp_path))
    utc = START.replace(tzinfo=timezone.utc)
    for start, seconds in ((utc, 90.0), (utc, 6.0), *spans):
        study.add_trial(FrozenTrial(
            number=0, state=TrialState.COMPLETE, value=1.0, datetime_start=start,
            datetime_complete=start + timedelta(seconds=seconds), params={}, distributions={},
            user_attrs={}, system_attrs={}, intermediate_values={}, trial_id=0,
        ))  # fmt: skip
    return study


def test_the_zone_is_really_not_utc() -> None:
    """Without the zone's data every run below would be in UTC, and prove nothing."""
    out = subprocess.run(
        [sys.executable, "-c", "import time; print(time.localtime(1782907200).tm_gmtoff)"],
        env={**os.environ, "TZ": "America/New_York"}, capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    assert int(out) == -4 * 3600  # 2026-07-01 12:00 UTC: EDT


def test_report_durations_are_the_same_in_every_timezone(tmp_path: Path) -> None:
    """Also across New York's daylight-saving changes: 1 h from 06:30 UTC on 2026-03-08 is
    01:30 EST to 03:30 EDT, 1.5 h from 05:30 UTC on 2026-11-01 is 01:30 EDT to 02:00 EST."""
    spring = datetime(2026, 3, 8, 6, 30, tzinfo=timezone.utc)
    autumn = datetime(2026, 11, 1, 5, 30, tzinfo=timezone.utc)
    _study(tmp_path, ((spring, 3600.0), (autumn, 5400.0)))
    for tz in ZONES:
        assert _durations(tmp_path, tz) == {0: 90.0, 1: 6.0, 2: 3600.0, 3: 5400.0}, tz


def test_a_study_written_by_optuna_4_keeps_its_durations(tmp_path: Path) -> None:
    """Optuna 4.x wrote local time where Optuna 5 reads UTC: both ends of a trial move by the
    same offset, so its duration stands."""
    _study(tmp_path)
    with sqlite3.connect(tmp_path / "optguard.db") as db:  # as written in New York by 4.x
        db.execute(
            "UPDATE trials SET datetime_start = datetime(datetime_start, '-4 hours'), "
            "datetime_complete = datetime(datetime_complete, '-4 hours')"
        )
    for tz in ZONES:
        assert _durations(tmp_path, tz) == {0: 90.0, 1: 6.0}, tz


RECOVER = """
import sys, optuna
from optguard.recovery import recover
from optguard.storage import open_storage
storage = open_storage(sys.argv[1])
study = optuna.load_study(study_name="tz", storage=storage)
print(recover(study, storage, study._study_id).reaped)
"""


def test_a_restart_judges_a_trials_owner_in_any_timezone(tmp_path: Path) -> None:
    """A live owner started before its trial is alive, a dead one is dead, in each zone: the
    trial's start (local time from the storage) is compared with the process's (epoch)."""
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        time.sleep(1.5)  # the trials start after the owner did, past create_time's rounding
        for tz in ZONES:
            study = optuna.create_study(
                study_name="tz", storage=sqlite_url(tmp_path), load_if_exists=True
            )
            owned = {}
            for pid in (live.pid, dead.pid):
                trial = study.ask()
                trial.set_user_attr("optguard.worker", f"{host}:{pid}")
                owned[pid] = trial.number
            out = subprocess.run(
                [sys.executable, "-c", RECOVER, sqlite_url(tmp_path)],
                env={**os.environ, "TZ": tz}, capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            running = [t.number for t in study.get_trials(states=(TrialState.RUNNING,))]
            assert json.loads(out) == [owned[dead.pid]], tz  # the dead owner's trial only
            assert owned[live.pid] in running, tz  # the live owner's trial stays RUNNING
    finally:
        live.kill()
        live.wait()
