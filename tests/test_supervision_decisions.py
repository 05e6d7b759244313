"""The supervisor's pure decisions: escalation of a trial, a worker's exit, the run's outcome."""

from __future__ import annotations

import signal

import pytest

from optguard.errors import StudyFailedError, StudyIncompleteError
from optguard.guard import REASON_MEMORY, REASON_TIMEOUT, Violation
from optguard.limits import Escalation, Limits
from optguard.progress import Progress
from optguard.supervision.escalation import (
    REASON_CANCELLED,
    STOP_GRACE_S,
    Step,
    Watched,
    decide,
    decide_cancel,
)
from optguard.supervision.exits import Exit, classify_exit, describe_exit
from optguard.supervision.outcome import Ended, fail_fast_error, incomplete_error

MB = 10**6
LIMITS = Limits(timeout_s=10.0, max_rss_bytes=100 * MB)
ESC = Escalation(grace_s=1.0, memory_grace_s=0.0, kill_after_s=2.0, memory_ceiling=1.25)
TIMEOUT = Violation(0, REASON_TIMEOUT, 11.5, 0, 10.0)
MEMORY = Violation(0, REASON_MEMORY, 1.0, 110 * MB, 100 * MB)


def _trial(**state: object) -> Watched:
    trial = Watched(number=0, trial_id=1, started=0.0)
    for key, value in state.items():
        setattr(trial, key, value)
    return trial


@pytest.mark.parametrize(
    ("state", "memory", "elapsed", "now", "checkpoint_until", "step"),
    [
        ({}, 50 * MB, 5.0, 5.0, 0.0, None),  # within every limit
        ({}, 50 * MB, 11.5, 11.5, 0.0, Step.INTERRUPT),  # past timeout + grace
        ({}, 50 * MB, 10.5, 10.5, 0.0, None),  # past the timeout, within the grace
        ({}, 110 * MB, 1.0, 1.0, 0.0, Step.INTERRUPT),  # memory, no memory grace
        ({}, 130 * MB, 1.0, 1.0, 0.0, Step.KILL_NOW),  # above the 1.25x ceiling
        # interrupted, acknowledged: --kill-after to end the trial, then the kill step
        ({"violation": TIMEOUT, "interrupted_at": 11.5, "acked": True}, 0, 13.0, 13.0, 0.0, None),
        ({"violation": TIMEOUT, "interrupted_at": 11.5, "acked": True}, 0, 14.0, 14.0, 0.0,
         Step.KILL),
        # not acknowledged within --kill-after: stuck in C (a 0.5 s allocation is not)
        ({"violation": TIMEOUT, "interrupted_at": 11.5}, 0, 12.1, 12.1, 0.0, None),
        ({"violation": TIMEOUT, "interrupted_at": 11.5}, 0, 14.0, 14.0, 0.0, Step.KILL_STUCK),
        # emergency checkpoints hold the kill step until their budget is spent...
        ({"violation": TIMEOUT, "interrupted_at": 11.5, "acked": True}, 0, 20.0, 20.0, 25.0,
         None),
        ({"violation": TIMEOUT, "interrupted_at": 11.5, "acked": True}, 0, 26.0, 26.0, 25.0,
         None),
        ({"violation": TIMEOUT, "interrupted_at": 11.5, "acked": True}, 0, 27.5, 27.5, 25.0,
         Step.KILL),
        # ...but never the memory ceiling
        ({"violation": MEMORY, "interrupted_at": 1.0, "acked": True}, 130 * MB, 2.0, 2.0, 50.0,
         Step.KILL_NOW),
        # already interrupted for memory, still above: no second interrupt
        ({"violation": MEMORY, "interrupted_at": 1.0, "acked": True}, 110 * MB, 2.0, 2.0, 0.0,
         None),
    ],
)
def test_decide(
    state: dict[str, object], memory: int, elapsed: float, now: float,
    checkpoint_until: float, step: Step | None,
) -> None:  # fmt: skip
    got = decide(_trial(**state), memory, elapsed, now, LIMITS, ESC, checkpoint_until)
    assert (None if got is None else got[0]) is step


def test_decide_memory_grace_soft_first() -> None:
    esc = Escalation(memory_grace_s=1.0, memory_ceiling=1.25, kill_after_s=2.0)
    assert decide(_trial(), 110 * MB, 1.0, 1.0, LIMITS, esc)[0] is Step.SOFT  # type: ignore[index]
    soft = _trial(violation=MEMORY, violation_at=1.0)
    assert decide(soft, 110 * MB, 1.5, 1.5, LIMITS, esc) is None
    assert decide(soft, 110 * MB, 2.1, 2.1, LIMITS, esc)[0] is Step.INTERRUPT  # type: ignore[index]


@pytest.mark.parametrize(
    ("state", "now", "step"),
    [
        ({}, 1.0, Step.SOFT),
        ({"violation": TIMEOUT, "violation_at": 0.0}, 1.0, Step.SOFT),  # cancel overrides
        ({"cancelled_at": 1.0}, 1.0 + STOP_GRACE_S - 1, None),
        ({"cancelled_at": 1.0}, 1.0 + STOP_GRACE_S + 0.1, Step.INTERRUPT),
        ({"cancelled_at": 1.0, "interrupted_at": 12.0}, 13.0, None),
        ({"cancelled_at": 1.0, "interrupted_at": 12.0}, 14.5, Step.KILL_STUCK),
        ({"cancelled_at": 1.0, "interrupted_at": 12.0, "acked": True}, 14.5, Step.KILL),
    ],
)
def test_decide_cancel(state: dict[str, object], now: float, step: Step | None) -> None:
    state = dict(state)
    if "cancelled_at" in state:
        at = state.pop("cancelled_at")
        state["violation"] = Violation(0, REASON_CANCELLED, 0.0, 0, 0.0)
        state["violation_at"] = at
    got = decide_cancel(_trial(**state), 0, now, now, ESC)
    assert (None if got is None else got[0]) is step


@pytest.mark.parametrize(
    ("code", "flags", "kind"),
    [
        (0, {"said_exiting": True}, Exit.DONE),
        (0, {}, Exit.DIED),  # exit 0 without saying so: os._exit(0) between trials
        (0, {"in_trial": True}, Exit.DIED),  # os._exit(0) inside a trial
        (0, {"said_exiting": True, "in_trial": True}, Exit.DIED),
        (-9, {"said_exiting": True, "ended": True}, Exit.ENDED),  # lingering, ended by us
        (-9, {"killed": True}, Exit.KILLED),
        (75, {}, Exit.RECYCLE),
        (2, {"ready": False}, Exit.START_FAILURE),
        (3, {"ready": False}, Exit.START_FAILURE),
        (2, {"ready": True}, Exit.DIED),
        (2, {"ready": False, "ended": True}, Exit.ENDED),  # SIGTERM while importing
        (1, {"said_exiting": True}, Exit.DONE),  # an atexit handler failed: no trial lost
    ],
)
def test_classify_exit(code: int, flags: dict[str, bool], kind: Exit) -> None:
    args = {"ready": True, "said_exiting": False, "in_trial": False, "killed": False,
            "ended": False, **flags}  # fmt: skip
    assert classify_exit(code, **args) is kind


@pytest.mark.parametrize(
    ("code", "sent", "oom", "cpu", "words", "not_words"),
    [
        (3, None, False, False, "exit code 3", "OOM"),
        (-9, "SIGKILL: --kill-after 1s", False, False, "sent by optguard", "OOM"),
        (-9, "SIGKILL: --kill-after 1s", True, False, "sent by optguard", "OOM"),
        (-9, None, True, False, "OOM killer", "optguard ("),
        (-9, None, False, False, "not sent by optguard", "OOM killer"),
        (-9, None, False, True, "RLIMIT_CPU", "OOM"),
        (-int(signal.SIGXCPU), None, False, False, "RLIMIT_CPU", "OOM"),
        (-15, None, False, False, "signal SIGTERM", "OOM"),
    ],
)
def test_describe_exit(
    code: int, sent: str | None, oom: bool, cpu: bool, words: str, not_words: str
) -> None:
    text = describe_exit(code, sent=sent, oom=oom, cpu_limit=cpu)
    assert words in text and not_words not in text


FAIL_A = Ended(0, "FAIL", "ValueError: boom")
FAIL_B = Ended(1, "FAIL", "KeyError: 'x'")
DONE = Ended(2, "COMPLETE")


@pytest.mark.parametrize(
    ("first", "n", "stops"),
    [
        ([FAIL_A, FAIL_A, FAIL_A], 3, True),
        ([FAIL_A, FAIL_A], 3, False),  # not enough yet
        ([FAIL_A, FAIL_B, FAIL_A], 3, False),  # different errors
        ([FAIL_A, DONE, FAIL_A], 3, False),  # one trial worked
        ([DONE, FAIL_A, FAIL_A, FAIL_A], 3, False),  # only the first n count
        ([FAIL_A, FAIL_A, FAIL_A], 0, False),  # --fail-fast 0
        ([FAIL_A], 1, True),
    ],
)
def test_fail_fast(first: list[Ended], n: int, stops: bool) -> None:
    error = fail_fast_error(first, n, "see logs/w.log")
    assert (error is not None) is stops
    if error is not None:
        assert isinstance(error, StudyFailedError) and "ValueError: boom" in str(error)
        assert error.exit_code == 5


@pytest.mark.parametrize(
    ("states", "n", "incomplete"),
    [
        ({"COMPLETE": 6}, 6, False),
        ({"COMPLETE": 4, "FAIL": 2}, 6, False),  # failed trials are finished trials
        ({"COMPLETE": 4, "RUNNING": 2}, 6, True),
        ({"COMPLETE": 6, "WAITING": 2}, 6, True),  # retries it was asked to run
        ({"COMPLETE": 5}, 6, True),
        ({"COMPLETE": 8}, 6, False),  # retries run past the total
        ({"COMPLETE": 3}, None, False),
    ],
)
def test_incomplete(states: dict[str, int], n: int | None, incomplete: bool) -> None:
    error = incomplete_error(Progress(states=states), n)
    assert (error is not None) is incomplete
    if error is not None:
        assert isinstance(error, StudyIncompleteError) and error.exit_code == 6
