"""A node stopped by its scheduler hands its trials over: the nodes still running retry them.

SIGTERM to one node's ``optguard run`` (Slurm's time limit or preemption, a Kubernetes pod
eviction) ends that node's trials as interrupts (``interrupted``, or ``cancelled`` for one
stuck in C) while the study goes on elsewhere. As the SIGTERM comes, the node lists the
trials it runs in a study user attribute of its own (``optguard.retry:<run>``), before they
end, so no live node can decide the study is done between the two. Every live supervisor
reads the study's user attributes each second anyway (stop and cancel requests), so it sees
the list at no extra cost; the first to take the study-wide lock enqueues, once, the listed
trials that the stop ended, and strikes off what is settled. No live node: the next
``optguard run`` of the study takes the list at its start (``recovery.recover``).

A list rather than a scan: finding the trials to retry costs a read of the listed trials,
not of the whole study on every node every second.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

__all__ = ["HANDOVER_PREFIX", "offer", "pending", "ripe", "settle", "take_handovers"]

HANDOVER_PREFIX = "optguard.retry:"
# the reasons a node's own end gives its trials (optguard.guard, optguard.supervision)
HANDED_REASONS = frozenset({"interrupted", "cancelled"})
_REASON = "optguard.reason"


def settle(trials: Iterable[FrozenTrial]) -> tuple[list[int], list[int]]:
    """Of the trials a stopped node listed: ``(numbers to retry, ids still running)``.
    Finished by that stop (``HANDED_REASONS``): retried. Finished otherwise (it completed or
    failed on its own before the stop reached it): owed nothing. Not finished yet: asked
    again later, so the list is written before the trials end and no live node can miss
    it between the two."""
    from optuna.trial import TrialState

    retry, running = [], []
    for trial in trials:
        if not trial.state.is_finished():
            running.append(trial._trial_id)
        elif trial.state in (TrialState.PRUNED, TrialState.FAIL) and (
            trial.user_attrs.get(_REASON) in HANDED_REASONS
        ):
            retry.append(trial.number)
    return sorted(retry), sorted(running)


def pending(attrs: Mapping[str, Any]) -> dict[str, list[int]]:
    """The trial ids still listed by stopped nodes, by key, in the study's user attributes
    ``attrs`` (a list all taken is left as ``None``)."""
    found = {}
    for key, value in attrs.items():
        if key.startswith(HANDOVER_PREFIX) and isinstance(value, dict):
            ids = value.get("trial_ids")
            if isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids):
                found[key] = ids
    return found


def offer(
    storage: optuna.storages.BaseStorage, study_id: int, run_id: str, trial_ids: Iterable[int]
) -> None:
    """List this node's ``trial_ids`` for the others, under this run's own key. The caller
    holds the study-wide lock: a node taking the list rewrites it."""
    value = {"trial_ids": sorted(trial_ids), "host": socket.gethostname(), "at": time.time()}
    storage.set_study_user_attr(study_id, HANDOVER_PREFIX + run_id, value)


def take_handovers(
    study: optuna.Study, storage: optuna.storages.BaseStorage, study_id: int
) -> list[int]:
    """Enqueue, once, every listed trial its node's stop ended, and strike off the list
    what is settled; the trial numbers enqueued. Reads the listed trials, and what says
    which trials were retried already only when one is to be retried. The caller
    holds the study-wide lock (``TrialSlots.lock``): two nodes taking at once do not both
    enqueue."""
    from optguard.recovery import retry_once

    retried: list[int] = []
    for key, ids in pending(storage.get_study_user_attrs(study_id)).items():
        listed = []
        for trial_id in ids:
            try:
                listed.append(storage.get_trial(trial_id))
            except KeyError:
                continue  # deleted with its study meanwhile: nothing to retry
        numbers, running = settle(listed)
        if numbers:
            retried += retry_once(study, storage, study_id, HANDED_REASONS, only=set(numbers))
        if not running:
            _forget(storage, study_id, key)
        elif running != sorted(ids):
            storage.set_study_user_attr(study_id, key, {"trial_ids": running, "at": time.time()})
    return sorted(retried)


def ripe(storage: optuna.storages.BaseStorage, lists: Mapping[str, list[int]]) -> bool:
    """Whether a listed trial has ended, read without the study-wide lock: the nodes still
    running ask this each second while a stopped node's trials end, and take the lock (which
    every claim of every host waits for) only when there is something to take."""
    for ids in lists.values():
        for trial_id in ids:
            try:
                if storage.get_trial(trial_id).state.is_finished():
                    return True
            except KeyError:
                return True  # deleted: the list is to be struck off
    return False


def _forget(storage: optuna.storages.BaseStorage, study_id: int, key: str) -> None:
    """Remove a taken list: each one left would be read by every node every second. Optuna
    has no call that deletes a study attribute; a journal file keeps it as ``None``."""
    from optguard.storage import rdb_backend

    backend = rdb_backend(storage)
    if backend is None:
        storage.set_study_user_attr(study_id, key, None)
        return
    from optuna.storages._rdb import models
    from sqlalchemy import delete

    attr = models.StudyUserAttributeModel
    with backend.engine.begin() as conn:
        conn.execute(delete(attr).where(attr.study_id == study_id, attr.key == key))
