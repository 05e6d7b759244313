"""A trial is created RUNNING with its owner in one transaction: ``ask_owned``.

``study.ask()`` followed by ``set_user_attr("optguard.worker", ...)`` leaves a window in which
a worker that dies has created a RUNNING trial nobody can attribute: not the supervisor (it
matches trials to workers by owner), not a restart (it checks the owner's pid), not another
host (it reaps by heartbeat, which needs the owner to have beaten once). Here the new trial's
row and its owner attributes are one commit, and so are popping an enqueued (WAITING) trial
and recording its owner: a trial is never RUNNING without an owner.

The same transaction counts the study's trials against ``n_trials``: a claim is one
transaction, as ``study.ask()``'s creation is, however many workers share the study.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

from optguard.progress import state_counts
from optguard.storage import rdb_backend
from optguard.user_attrs import upsert_user_attrs

if TYPE_CHECKING:
    import optuna

__all__ = ["adopt", "ask_owned", "claim_row", "give_back"]


def claim_row(
    backend: Any, study_id: int, attrs: dict[str, Any], n_trials: int | None
) -> tuple[int, Any] | None:
    """In one transaction: the oldest WAITING trial set RUNNING, else a new RUNNING trial
    unless the study has ``n_trials`` (finished or running), each with ``attrs``.

    Returns ``(trial_id, frozen)``, ``frozen`` being the new trial (``None`` for a popped
    one), or ``None`` when the study has its trials. The caller serializes claims
    (``TrialSlots.lock``); the study row's lock also orders trial numbers, as in Optuna.
    """
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import FrozenTrial, TrialState

    with _create_scoped_session(backend.scoped_session) as session:
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        counts = {state: int(n) for state, n in session.execute(state_counts(study_id))}
        if counts.get(TrialState.WAITING):
            row = (
                session.query(models.TrialModel)
                .filter(models.TrialModel.study_id == study_id)
                .filter(models.TrialModel.state == TrialState.WAITING)
                .order_by(models.TrialModel.trial_id)
                .with_for_update()
                .first()
            )
            if row is not None:
                row.state = TrialState.RUNNING
                row.datetime_start = datetime.now()
                upsert_user_attrs(backend, session, row.trial_id, attrs)
                return int(row.trial_id), None
        taken = sum(n for state, n in counts.items() if state != TrialState.WAITING)
        if n_trials is not None and taken >= n_trials:
            return None
        # Optuna's _get_prepared_new_trial, less a query per attribute (a new trial has none)
        row = models.TrialModel(
            study_id=study_id, number=None, state=TrialState.RUNNING, datetime_start=datetime.now()
        )
        session.add(row)
        session.flush()
        session.add_all(
            models.TrialUserAttributeModel(
                trial_id=row.trial_id, key=key, value_json=json.dumps(value)
            )
            for key, value in attrs.items()
        )
        # Optuna's count_past_trials, without its second pass over the study's rows: under
        # the study row's lock (every creator takes it) the trials before this one are
        # exactly those just counted
        row.number = sum(counts.values())
        frozen = FrozenTrial(
            number=row.number, state=TrialState.RUNNING, value=None,
            datetime_start=row.datetime_start, datetime_complete=None, params={},
            distributions={}, user_attrs=dict(attrs), system_attrs={}, intermediate_values={},
            trial_id=row.trial_id,
        )  # fmt: skip
        return int(row.trial_id), frozen


def give_back(backend: Any, trial_id: int, owner: dict[str, Any]) -> bool:
    """A trial ``claim_row`` made RUNNING for a worker that never got it (it died while the
    claim ran in its supervisor's gateway): WAITING again and without the owner, so that
    the next claim runs it under its number, as an enqueued trial. ``False`` when it is no
    longer RUNNING under ``owner`` (the supervisor judged the dead worker first, or an
    attempt whose reply was lost gave it back and another worker has claimed it since)."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import TrialState

    attr = models.TrialUserAttributeModel
    with _create_scoped_session(backend.scoped_session) as session:
        row = (
            session.query(models.TrialModel)
            .filter(models.TrialModel.trial_id == trial_id)
            .with_for_update()
            .one_or_none()
        )
        if row is None or row.state != TrialState.RUNNING:
            return False
        held = dict(
            session.query(attr.key, attr.value_json).filter(
                attr.trial_id == trial_id, attr.key.in_(list(owner))
            )
        )
        if {key: json.loads(value) for key, value in held.items()} != owner:
            return False
        row.state = TrialState.WAITING
        row.datetime_start = None
        session.query(attr).filter(attr.trial_id == trial_id, attr.key.in_(list(owner))).delete(
            synchronize_session=False
        )
        return True


def ask_owned(
    study: optuna.Study, attrs: dict[str, Any], n_trials: int | None = None
) -> optuna.trial.Trial | None:
    """What ``study.ask()`` does (an enqueued trial first, else a new one), with the user
    attributes ``attrs`` (the owner) written in the same transaction that makes it RUNNING;
    ``None`` once the study has ``n_trials`` and nothing is enqueued. Not retried here: the
    caller retries the whole claim through an outage (``TrialSlots.claim``)."""
    backend = rdb_backend(study._storage)
    if backend is None:
        return _ask_owned_elsewhere(study, attrs, n_trials)
    claimed = claim_row(backend, study._study_id, attrs, n_trials)
    return None if claimed is None else adopt(study, *claimed)


def adopt(study: optuna.Study, trial_id: int, frozen: Any) -> optuna.trial.Trial:
    """The claimed trial ``trial_id`` as ``study.ask()`` returns it, its cache told as
    ``study.ask()`` tells it: ``frozen`` is the new trial, ``None`` for a popped (or found)
    one, which the cache reads from the storage. The claim may have run in another process
    (``optguard.gateway``)."""
    import optuna
    from optuna.storages._cached_storage import _CachedStorage, _StudyInfo

    study._thread_local.cached_all_trials = None
    cache = study._storage
    if frozen is None or not isinstance(cache, _CachedStorage):
        study._storage.get_all_trials(study._study_id, deepcopy=False)
    else:
        with cache._lock:  # as _CachedStorage.create_new_trial does with its new trial
            cache._studies.setdefault(study._study_id, _StudyInfo())
            cache._add_trials_to_cache(study._study_id, [frozen])
    return optuna.Trial(study, trial_id)


def _ask_owned_elsewhere(
    study: optuna.Study, attrs: dict[str, Any], n_trials: int | None
) -> optuna.trial.Trial | None:
    """``ask_owned`` on a storage without transactions (Optuna's journal file), under the
    caller's lock: a new trial and its owner are one journal record (a template trial); an
    enqueued one is given its owner while still WAITING, then set RUNNING, so that a worker
    dying in between leaves a WAITING trial (run later), never an ownerless RUNNING one."""
    import optuna
    from optuna.trial import FrozenTrial, TrialState

    storage = study._storage
    trials = storage.get_all_trials(study._study_id, deepcopy=False)
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    taken = len(trials) - len(waiting)
    for trial in waiting:
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial._trial_id, key, value)
        if storage.set_trial_state_values(trial._trial_id, TrialState.RUNNING):
            study._thread_local.cached_all_trials = None
            return optuna.Trial(study, trial._trial_id)
        # popped by a process outside optguard's lock (a plain study.optimize): the next one
    if n_trials is not None and taken >= n_trials:
        return None
    template = FrozenTrial(
        number=0, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(),
        datetime_complete=None, params={}, distributions={}, user_attrs=dict(attrs),
        system_attrs={}, intermediate_values={}, trial_id=0,
    )  # fmt: skip
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    return optuna.Trial(study, trial_id)
