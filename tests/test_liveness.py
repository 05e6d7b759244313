"""``optguard.liveness``: the one decision about whether a RUNNING trial's owner is alive; the
records a retry of its trial carries."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from optguard.liveness import Beat, Owner, Proc, Verdict, parse_owner, probe, trial_verdict

HERE = "hosta"
MINE = Owner(HERE, 4242)
THEIRS = Owner("hostb", 4242)


@pytest.mark.parametrize(
    ("owner", "proc", "beat", "verdict"),
    [
        # On the owner's host the process decides, whatever the beats say.
        (MINE, Proc.RUNNING, Beat.STALE, Verdict.ALIVE),  # stuck in C: alive
        (MINE, Proc.RUNNING, Beat.NEVER, Verdict.ALIVE),
        (MINE, Proc.ZOMBIE, Beat.FRESH, Verdict.DEAD),  # a zombie is dead
        (MINE, Proc.GONE, Beat.FRESH, Verdict.DEAD),
        (MINE, Proc.REUSED, Beat.FRESH, Verdict.DEAD),  # pid now names another process
        (MINE, Proc.UNREADABLE, Beat.STALE, Verdict.UNKNOWN),
        # Elsewhere only the heartbeat can tell.
        (THEIRS, None, Beat.FRESH, Verdict.ALIVE),
        (THEIRS, None, Beat.STALE, Verdict.DEAD),
        (THEIRS, None, Beat.NEVER, Verdict.UNBEATEN),  # died before its first beat
        # No owner (plain Optuna wrote it): the heartbeat too.
        (None, None, Beat.FRESH, Verdict.ALIVE),
        (None, None, Beat.STALE, Verdict.DEAD),
        (None, None, Beat.NEVER, Verdict.UNBEATEN),
        # This host's owner but not probed (the caller skips its own live workers).
        (MINE, None, Beat.STALE, Verdict.DEAD),
    ],
)
def test_trial_verdict(owner: Owner | None, proc: Proc | None, beat: Beat, verdict: Verdict) -> None:
    assert trial_verdict(owner, HERE, proc, beat, supervised=True) is verdict


@pytest.mark.parametrize(
    ("owner", "beat", "verdict"),
    [
        # A worker started by hand (or plain Optuna) never beats: never-beaten is alive...
        (THEIRS, Beat.NEVER, Verdict.ALIVE),
        (None, Beat.NEVER, Verdict.ALIVE),
        # ...but beats that stopped still mean its host died.
        (THEIRS, Beat.STALE, Verdict.DEAD),
        (THEIRS, Beat.FRESH, Verdict.ALIVE),
    ],
)
def test_trial_verdict_unsupervised(owner: Owner | None, beat: Beat, verdict: Verdict) -> None:
    assert trial_verdict(owner, HERE, None, beat, supervised=False) is verdict


@pytest.mark.parametrize(
    ("tag", "owner"),
    [
        ("hosta:12", Owner("hosta", 12)),
        ("a:b:12", Owner("a:b", 12)),
        ("hosta:", None),
        (":12", None),
        ("hosta:x", None),
        (None, None),
        (12, None),
    ],
)
def test_parse_owner(tag: object, owner: Owner | None) -> None:
    assert parse_owner(tag) == owner


def test_probe_sees_running_zombie_gone_and_reused() -> None:
    started = time.time()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    while True:  # exited but not reaped: a zombie
        with open(f"/proc/{child.pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.01)
    assert probe(child.pid, started) is Proc.ZOMBIE
    child.wait()
    assert probe(child.pid, started) is Proc.GONE
    assert probe(os.getpid(), time.time()) is Proc.RUNNING
    assert probe(os.getpid(), 0.0) is Proc.REUSED  # this process started after "the trial"


@pytest.mark.parametrize(
    ("system_attrs", "number", "expected"),
    [
        ({}, 5, {"failed_trial": 5, "retry_history": [5]}),
        # a retry Optuna's own callback made, failing again: the series goes on
        ({"failed_trial": 2, "retry_history": [2]}, 7, {"failed_trial": 2, "retry_history": [2, 7]}),
        ({"fixed_params": {"x": 1}}, 3, {"failed_trial": 3, "retry_history": [3]}),
    ],
)
def test_a_retry_carries_optunas_retry_records(
    system_attrs: dict[str, object], number: int, expected: dict[str, object]
) -> None:
    """What RetryHeartbeatStaleTrialCallback writes, so its readers answer for optguard."""
    import optuna

    from optguard.recovery import retry_records

    trial = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, system_attrs=system_attrs)
    trial.number = number
    assert retry_records(trial) == expected
