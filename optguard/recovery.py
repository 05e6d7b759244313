"""Resuming a study after a crash or a fix: reap what a dead run left RUNNING, retry once.

Runs in ``optguard run`` before any worker starts, under the same study-wide lock that hands
out trials, so two hosts restarting at once neither reap a live trial nor enqueue twice.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Collection, Iterable

from optguard.liveness import Beat, Verdict, parse_owner, probe_trial, trial_verdict

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

__all__ = [
    "Recovery",
    "mark_interrupted",
    "reap_stale",
    "recover",
    "retry_once",
    "retry_records",
]

ATTR = "optguard."
REASON_INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class Recovery:
    """What a restart did: trials reaped as interrupted, and trials enqueued again."""

    reaped: list[int]
    retried: list[int]
    cleared: str | None = None  # a stop/cancel request left by an earlier run, now cleared


def mark_interrupted(storage: optuna.storages.BaseStorage, trial_id: int, why: str) -> bool:
    """FAIL a RUNNING trial with reason ``interrupted``; False if it finished meanwhile."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    from optguard.storage import set_trial_user_attrs

    try:
        set_trial_user_attrs(
            storage, trial_id, {ATTR + "reason": REASON_INTERRUPTED, ATTR + "error": why}
        )
        return bool(storage.set_trial_state_values(trial_id, TrialState.FAIL))
    except UpdateFinishedTrialError:
        return False  # finished after all (or another host reaped it first)


def _never_beaten(storage: optuna.storages.RDBStorage, study_id: int) -> set[int]:
    """RUNNING trials of the study without a heartbeat row: Optuna's stale query skips them."""
    from optuna.storages._rdb import models
    from optuna.trial import TrialState
    from sqlalchemy import select

    trial, beat = models.TrialModel, models.TrialHeartbeatModel
    stmt = (
        select(trial.trial_id)
        .outerjoin(beat, beat.trial_id == trial.trial_id)
        .where(
            trial.study_id == study_id,
            trial.state == TrialState.RUNNING,
            beat.trial_heartbeat_id.is_(None),
        )
    )
    with storage.engine.connect() as conn:
        return {int(row[0]) for row in conn.execute(stmt)}


def _reap(
    storage: optuna.storages.BaseStorage,
    trials: Iterable[FrozenTrial],
    beats: dict[int, Beat],
    skip_pids: frozenset[int] = frozenset(),
) -> list[int]:
    """FAIL ``interrupted`` every RUNNING trial whose owner ``liveness`` finds dead; give a
    first heartbeat to other hosts' trials that never beat, so they can go stale."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    reaped = []
    for trial in trials:
        if trial.state != TrialState.RUNNING:
            continue
        tag = trial.user_attrs.get(ATTR + "worker")
        owner = parse_owner(tag)
        proc = None
        if owner is not None and owner.host == host:
            if owner.pid in skip_pids:
                continue  # this run's own worker: its exit is handled where it is reaped
            proc = probe_trial(owner, trial)
        beat = beats.get(trial._trial_id, Beat.FRESH)
        supervised = trial.user_attrs.get(ATTR + "beats") is True
        verdict = trial_verdict(owner, host, proc, beat, supervised)
        if verdict is Verdict.UNBEATEN:
            storage.record_heartbeat(trial._trial_id)  # the database's clock starts its grace
        elif verdict is Verdict.DEAD:
            why = (
                f"worker {tag} is gone: the run died"
                if proc is not None
                else f"no heartbeat from worker {tag or '?'}: its host died"
            )
            if mark_interrupted(storage, trial._trial_id, why):
                reaped.append(trial.number)
    return reaped


def reap_stale(
    study: optuna.Study,
    storage: optuna.storages.RDBStorage,
    study_id: int,
    skip_pids: frozenset[int] = frozenset(),
) -> Recovery:
    """Trials whose owner died -> FAIL ``interrupted``, retried once.

    On this host the owner's process decides (``skip_pids``: this run's live workers, whose
    exits the supervisor records itself); elsewhere the heartbeat, from the storage's own
    stale query (the one Optuna's ``fail_stale_trials`` uses, so the reason is recorded
    before the trial becomes read-only) and a first beat for trials that never beat.
    """
    from optuna.trial import TrialState

    beats = dict.fromkeys(_never_beaten(storage, study_id), Beat.NEVER)
    beats.update(dict.fromkeys(storage._get_stale_trial_ids(study_id), Beat.STALE))
    running = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
    reaped = _reap(storage, running, beats, skip_pids)
    retried = retry_once(study, storage, study_id, {REASON_INTERRUPTED}) if reaped else []
    return Recovery(reaped=reaped, retried=retried)


def retry_once(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    study_id: int,
    reasons: Collection[str],
    only: Collection[int] | None = None,
) -> list[int]:
    """Enqueue, once, the parameters of finished trials that optguard ended for ``reasons``
    (of the trial numbers ``only``, if given). The caller holds the study-wide lock
    (``TrialSlots.lock``). Reads only what decides it (``_retry_view``): a restart of every
    host of a big study must not load the study on each."""
    from optuna.trial import TrialState

    trials, done = _retry_view(storage, study_id)
    retried = []
    for trial in trials:
        if trial.state not in (TrialState.PRUNED, TrialState.FAIL) or trial.number in done:
            continue
        if only is not None and trial.number not in only:
            continue
        if ATTR + "retry_of" in trial.user_attrs:
            continue  # a retry is not retried again: once per configuration
        if trial.user_attrs.get(ATTR + "reason") not in reasons:
            continue  # (a trial ended before it suggested anything is retried too: its slot)
        _enqueue_retry(study, trial)
        retried.append(trial.number)
    return retried


def _retry_view(
    storage: optuna.storages.BaseStorage, study_id: int
) -> tuple[list["FrozenTrial"], set[int]]:
    """``(trials that may be owed a retry, numbers already retried)``. On an RDB storage one
    query over the two user attributes that decide it (``optguard.reason``, ``.retry_of``)
    names the pruned or failed trials with a reason; only those are loaded. A journal file
    is read whole (Optuna replays it in memory anyway)."""
    from optuna.trial import TrialState

    from optguard.storage import rdb_backend

    backend = rdb_backend(storage)
    if backend is None:
        trials = storage.get_all_trials(study_id, deepcopy=False)
        return trials, {t.user_attrs.get(ATTR + "retry_of") for t in trials} - {None}
    import json

    from optuna.storages._rdb import models
    from sqlalchemy import select

    trial, attr = models.TrialModel, models.TrialUserAttributeModel
    stmt = (
        select(trial.trial_id, trial.state, attr.key, attr.value_json)
        .join(attr, attr.trial_id == trial.trial_id)
        .where(trial.study_id == study_id, attr.key.in_([ATTR + "reason", ATTR + "retry_of"]))
    )
    with backend.engine.connect() as conn:
        rows = conn.execute(stmt).all()
    done = {json.loads(v) for _, _, key, v in rows if key == ATTR + "retry_of"}
    retries = {int(i) for i, _, key, _ in rows if key == ATTR + "retry_of"}
    ended = (TrialState.PRUNED, TrialState.FAIL)
    owed = sorted(
        {int(i) for i, state, key, _ in rows if key == ATTR + "reason" and state in ended} - retries
    )
    return [storage.get_trial(trial_id) for trial_id in owed], done


def retry_records(trial: "FrozenTrial") -> dict[str, Any]:
    """The system attributes Optuna's ``RetryHeartbeatStaleTrialCallback`` writes on the
    retry of ``trial``, so that its ``retried_trial_number`` (the first trial of the series)
    and ``retry_history`` (every trial of it, in order) answer for optguard's retries too."""
    history = trial.system_attrs.get("retry_history", [])
    first = trial.system_attrs.get("failed_trial", trial.number)
    return {"failed_trial": first, "retry_history": [*history, trial.number]}


def _enqueue_retry(study: optuna.Study, trial: "FrozenTrial") -> None:
    """``study.enqueue_trial(trial.params)`` with ``optguard.retry_of`` and Optuna's retry
    records, in the one transaction that creates the WAITING trial."""
    import optuna

    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING,
            system_attrs={"fixed_params": dict(trial.params), **retry_records(trial)},
            user_attrs={ATTR + "retry_of": trial.number},
        )
    )


def recover(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    study_id: int,
    retry_reasons: Iterable[str] = (),
) -> Recovery:
    """Clear a pending stop/cancel, reap trials whose worker is gone, then retry interrupted
    ones and ``retry_reasons``."""
    from optuna.trial import TrialState

    from optguard.control import clear_request
    from optguard.handover import take_handovers

    cleared = clear_request(storage, study_id)
    # Read from the storage itself, not the study's cache: _reap has just changed states.
    # Only this host's dead owners here: other hosts' trials are the heartbeat's to judge.
    running = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
    reaped = _reap(storage, running, {})
    retried = retry_once(study, storage, study_id, {REASON_INTERRUPTED, *retry_reasons})
    # what nodes stopped by their scheduler left for the others, none of them running now
    retried += take_handovers(study, storage, study_id)
    return Recovery(reaped=reaped, retried=sorted(retried), cleared=cleared)
