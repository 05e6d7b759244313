"""The host's one copy of the study's trials, from which the gateway answers its workers'
trial reads.

A worker's Optuna cache (``_CachedStorage``) asks for the trials it lacks: on its first ask,
the whole study. Answered from the database, a host of W workers joining a study of T trials
has the supervisor decode W x T rows, one worker after another, where W processes used to
decode them side by side; and a cluster starting at once reads its study once per worker.
Kept here as Optuna keeps its cache (a finished trial never changes; what is unfinished or
newer than the last finished is read again at each call), the database is asked only what
changed since the last call of any worker, and each worker is sent what it lacks.
"""

from __future__ import annotations

import bisect
import threading
from typing import TYPE_CHECKING, Any, Container, Iterable

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

__all__ = ["TrialCache"]


class TrialCache:
    """Answers ``_get_trials`` (the RDB call behind Optuna's cache) for one study."""

    def __init__(self, storage: Any, study_id: int) -> None:
        self._storage = storage
        self._study_id = study_id
        self._lock = threading.Lock()  # one sync at a time; they share one connection anyway
        self._by_id: dict[int, FrozenTrial] = {}
        self._ids: list[int] = []  # of _by_id, sorted
        self._unfinished: set[int] = set()
        self._last_finished = -1

    def get_trials(
        self,
        study_id: int,
        states: Container[Any] | None,
        included_trial_ids: Iterable[int],
        trial_id_greater_than: int,
    ) -> list[FrozenTrial]:
        """As ``RDBStorage._get_trials``: the trials above ``trial_id_greater_than`` and
        those of ``included_trial_ids``, as the database holds them now."""
        if study_id != self._study_id or states is not None:
            return list(
                self._storage._get_trials(
                    study_id, states, included_trial_ids, trial_id_greater_than
                )
            )
        with self._lock:
            self._sync()
            first = bisect.bisect_right(self._ids, trial_id_greater_than)
            older = sorted(
                i for i in included_trial_ids if i in self._by_id and i <= trial_id_greater_than
            )
            return [self._by_id[i] for i in older + self._ids[first:]]

    def _sync(self) -> None:
        """Read what changed since the last call, as Optuna's cache reads it."""
        trials = self._storage._get_trials(
            self._study_id,
            states=None,
            included_trial_ids=set(self._unfinished),
            trial_id_greater_than=self._last_finished,
        )
        for trial in trials:
            trial_id = trial._trial_id
            if trial_id not in self._by_id:
                bisect.insort(self._ids, trial_id)
            self._by_id[trial_id] = trial
            if trial.state.is_finished():
                self._unfinished.discard(trial_id)
                self._last_finished = max(self._last_finished, trial_id)
            else:
                self._unfinished.add(trial_id)
