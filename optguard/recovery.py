"""Resuming a study after a crash or a fix: reap what a dead run left RUNNING, retry once.

Runs in ``optguard run`` before any worker starts, under the same study-wide lock that hands
out trials, so two hosts restarting at once neither reap a live trial nor enqueue twice.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import psutil

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

__all__ = ["Recovery", "recover"]

ATTR = "optguard."
REASON_INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class Recovery:
    """What a restart did: trials reaped as interrupted, and trials enqueued again."""

    reaped: list[int]
    retried: list[int]
    cleared: str | None = None  # a stop/cancel request left by an earlier run, now cleared


def _worker_is_gone(tag: str, started_at: float, host: str) -> bool:
    """True when ``host:pid`` names a process on this host that no longer runs the trial.

    A pid reused by a process started after the trial is the same as a dead one.
    """
    tag_host, _, pid_text = tag.rpartition(":")
    if tag_host != host or not pid_text.isdigit():
        return False  # another host's worker: only its heartbeat can tell (not here)
    try:
        return psutil.Process(int(pid_text)).create_time() > started_at
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False  # cannot tell (permissions): leave the trial alone


def _reap(storage: "optuna.storages.BaseStorage", trials: Iterable["FrozenTrial"]) -> list[int]:
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    host = socket.gethostname()
    reaped = []
    for trial in trials:
        tag = trial.user_attrs.get(ATTR + "worker")
        if trial.state != TrialState.RUNNING or not isinstance(tag, str):
            continue
        started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
        if not _worker_is_gone(tag, started, host):
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, ATTR + "reason", REASON_INTERRUPTED)
            storage.set_trial_user_attr(
                trial._trial_id, ATTR + "error", f"worker {tag} is gone: the run died"
            )
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # finished after all, between the read and the write
        reaped.append(trial.number)
    return reaped


def _retry(
    study: "optuna.Study", trials: list["FrozenTrial"], reasons: set[str]
) -> list[int]:
    """Enqueue, once, the parameters of finished trials that optguard ended for ``reasons``."""
    from optuna.trial import TrialState

    done = {t.user_attrs.get(ATTR + "retry_of") for t in trials}
    retried = []
    for trial in trials:
        if trial.state not in (TrialState.PRUNED, TrialState.FAIL) or trial.number in done:
            continue
        if ATTR + "retry_of" in trial.user_attrs:
            continue  # a retry is not retried again: once per configuration
        if trial.user_attrs.get(ATTR + "reason") not in reasons or not trial.params:
            continue
        study.enqueue_trial(dict(trial.params), user_attrs={ATTR + "retry_of": trial.number})
        retried.append(trial.number)
    return retried


def recover(
    study: "optuna.Study",
    storage: "optuna.storages.BaseStorage",
    study_id: int,
    retry_reasons: Iterable[str] = (),
) -> Recovery:
    """Clear a pending stop/cancel, reap trials whose worker is gone, then retry interrupted
    ones and ``retry_reasons``."""
    from optguard.control import clear_request

    cleared = clear_request(storage, study_id)
    reaped = _reap(storage, study.get_trials(deepcopy=False))
    trials = study.get_trials(deepcopy=False)
    retried = _retry(study, trials, {REASON_INTERRUPTED, *retry_reasons})
    return Recovery(reaped=reaped, retried=retried, cleared=cleared)
