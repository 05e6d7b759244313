"""What a worker may ask of its supervisor's storage, and how answers and errors travel.

A request is ``(seq, call)``, ``call`` being ``(name, args, kwargs)`` pickled on its own: a
value the supervisor cannot unpickle (a class of the objective's module) fails that call,
not the worker's whole channel. An answer is ``(kind, seq, payload)``, where kind is ``OK``
(the result), ``ERROR`` (the exception, raised again in the worker), ``RETRYING`` (the call
waits out an outage: the worker may give it up meanwhile by sending ``(CANCEL, seq)``) or
``CANCELLED`` (given up between two attempts: nothing of it was done). A call given up
during an attempt is answered ``OK`` or ``ERROR`` as usual, and the worker waits for that
last answer before it raises its interrupt: a call is never left half known. Messages are
pickled by ``multiprocessing.connection`` over a socket pair only the two processes hold.
"""

from __future__ import annotations

import pickle

from optguard.errors import StorageError
from optguard.urls import journal_path, sqlite_path

__all__ = [
    "CANCEL",
    "CANCELLED",
    "ERROR",
    "FD_ENV",
    "OK",
    "OPERATIONS",
    "RETRYING",
    "STORAGE_METHODS",
    "portable",
    "serves",
]

FD_ENV = "OPTGUARD_GATEWAY_FD"  # the worker's end of its socket pair
OK, ERROR, RETRYING, CANCEL, CANCELLED = "ok", "error", "retrying", "cancel", "cancelled"

# The RDB storage methods a worker's calls reach: Optuna's BaseStorage, and those Optuna's
# cache (``_CachedStorage``) calls on its backend. Anything else is refused.
STORAGE_METHODS = frozenset({
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_all_studies",
    "create_new_trial", "_create_new_trial", "set_trial_param", "_set_trial_param",
    "get_trial_id_from_study_id_trial_number", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial", "get_all_trials",
    "_get_trials", "_get_best_trial_id", "record_heartbeat", "_get_stale_trial_ids",
})  # fmt: skip
# optguard's own steps, each one call: a claim (lock, count and creation), the owner's and
# the closing attributes in the finishing transaction, the study's trial count.
OPERATIONS = frozenset({"claim", "set_trial_user_attrs", "set_trial_state_values", "count_trials"})


def serves(url: str) -> bool:
    """Whether workers of ``optguard run`` reach ``url`` through their supervisor: a
    database server, not a file."""
    return sqlite_path(url) is None and journal_path(url) is None


def portable(exc: Exception) -> Exception:
    """``exc`` as it can be raised again in the worker: itself when it survives pickling
    (``KeyError``, Optuna's errors, ``StorageError``), else a ``StorageError`` naming it."""
    try:
        again = pickle.loads(pickle.dumps(exc))
    except Exception:  # deliberately broad: any exception may fail to pickle its own way
        again = None
    if type(again) is type(exc):
        return exc
    return StorageError(f"{type(exc).__name__}: {exc}")
