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


def _mark_interrupted(storage: "optuna.storages.BaseStorage", trial_id: int, why: str) -> bool:
    """FAIL a RUNNING trial with reason ``interrupted``; False if it finished meanwhile."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        storage.set_trial_user_attr(trial_id, ATTR + "reason", REASON_INTERRUPTED)
        storage.set_trial_user_attr(trial_id, ATTR + "error", why)
        return bool(storage.set_trial_state_values(trial_id, TrialState.FAIL))
    except UpdateFinishedTrialError:
        return False  # finished after all (or another host reaped it first)


def _reap(storage: "optuna.storages.BaseStorage", trials: Iterable["FrozenTrial"]) -> list[int]:
    from optuna.trial import TrialState

    host = socket.gethostname()
    reaped = []
    for trial in trials:
        tag = trial.user_attrs.get(ATTR + "worker")
        if trial.state != TrialState.RUNNING or not isinstance(tag, str):
            continue
        started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
        if _worker_is_gone(tag, started, host) and _mark_interrupted(
            storage, trial._trial_id, f"worker {tag} is gone: the run died"
        ):
            reaped.append(trial.number)
    return reaped


def reap_stale(
    study: "optuna.Study", storage: "optuna.storages.RDBStorage", study_id: int
) -> Recovery:
    """Trials whose heartbeat stopped (their host died) -> FAIL ``interrupted``, retried once.

    Uses the storage's stale-trial query, the one Optuna's ``fail_stale_trials`` uses, so the
    reason can be recorded before the trial becomes read-only.
    """
    reaped = []
    for trial_id in storage._get_stale_trial_ids(study_id):
        trial = storage.get_trial(trial_id)
        tag = trial.user_attrs.get(ATTR + "worker", "?")
        if _mark_interrupted(storage, trial_id, f"no heartbeat from worker {tag}: its host died"):
            reaped.append(trial.number)
    trials = storage.get_all_trials(study_id, deepcopy=False)
    retried = _retry(study, trials, {REASON_INTERRUPTED}) if reaped else []
    return Recovery(reaped=reaped, retried=retried)


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
    # Read from the storage itself, not the study's cache: _reap has just changed states.
    reaped = _reap(storage, storage.get_all_trials(study_id, deepcopy=False))
    trials = storage.get_all_trials(study_id, deepcopy=False)
    retried = _retry(study, trials, {REASON_INTERRUPTED, *retry_reasons})
    return Recovery(reaped=reaped, retried=retried, cleared=cleared)
