"""A trial is created RUNNING with its owner in one transaction: ``ask_owned``.

``study.ask()`` followed by ``set_user_attr("optguard.worker", ...)`` leaves a window in which
a worker that dies has created a RUNNING trial nobody can attribute: not the supervisor (it
matches trials to workers by owner), not a restart (it checks the owner's pid), not another
host (it reaps by heartbeat, which needs the owner to have beaten once). Here the new trial's
row and its owner attributes are one commit, and so are popping an enqueued (WAITING) trial
and recording its owner: a trial is never RUNNING without an owner.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

__all__ = ["ask_owned"]


def _rdb_backend(study: optuna.Study) -> Any:
    """The study's ``RDBStorage`` (behind Optuna's cache), or None for another storage."""
    from optuna.storages import RDBStorage

    storage = study._storage
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, RDBStorage) else None


def _pop_waiting(study: optuna.Study, backend: Any, attrs: dict[str, Any]) -> int | None:
    """The oldest WAITING trial set RUNNING with ``attrs``, in one transaction each try.

    The list comes through the study's cached storage, as in ``Study.ask``: the cache must
    know a trial before ``set_trial_param`` on it works.
    """
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import TrialState

    waiting_trials = study._storage.get_all_trials(
        study._study_id, deepcopy=False, states=(TrialState.WAITING,)
    )
    for waiting in waiting_trials:
        with _create_scoped_session(backend.scoped_session, True) as session:
            row = models.TrialModel.find_or_raise_by_id(waiting._trial_id, session, for_update=True)
            if row.state != TrialState.WAITING:
                continue  # another worker popped it first
            row.state = TrialState.RUNNING
            row.datetime_start = datetime.now()
            for key, value in attrs.items():
                backend._set_trial_attr_without_commit(
                    session, models.TrialUserAttributeModel, row.trial_id, key, value
                )
            return int(row.trial_id)
    return None


def _new_running(study: optuna.Study, attrs: dict[str, Any]) -> int:
    from optuna.trial import FrozenTrial, TrialState

    template = FrozenTrial(
        number=0,
        state=TrialState.RUNNING,
        value=None,
        datetime_start=datetime.now(),
        datetime_complete=None,
        params={},
        distributions={},
        user_attrs=dict(attrs),
        system_attrs={},
        intermediate_values={},
        trial_id=0,
    )
    return study._storage.create_new_trial(study._study_id, template_trial=template)


def ask_owned(study: optuna.Study, attrs: dict[str, Any]) -> optuna.trial.Trial:
    """What ``study.ask()`` does (an enqueued trial first, else a new one), with the user
    attributes ``attrs`` (the owner) written in the same transaction that makes it RUNNING."""
    import optuna

    backend = _rdb_backend(study)
    if backend is None:  # not an RDB storage: the best it offers is ask, then attributes
        trial = study.ask()
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return trial
    study._thread_local.cached_all_trials = None
    trial_id = _pop_waiting(study, backend, attrs)
    if trial_id is None:
        trial_id = _new_running(study, attrs)
    return optuna.Trial(study, trial_id)
