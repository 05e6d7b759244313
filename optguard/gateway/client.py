"""The worker's side: a storage whose every call is answered by the supervisor's gateway.

Optuna's cache (``_CachedStorage``) sits on top, as on an RDB storage, so the sampler reads
only what changed since its last ask: one call, whatever the study's size. A call holds back
the worker's interrupts like any storage call (``optguard.storage_calls``), except while
the supervisor waits out an outage for it: then an interrupt gives the call up at once.
"""

from __future__ import annotations

import functools
import os
import pickle
import threading
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Callable

from optguard.errors import StorageError
from optguard.gateway.protocol import (
    CANCEL,
    CANCELLED,
    ERROR,
    FD_ENV,
    OK,
    RETRYING,
    STORAGE_METHODS,
)
from optguard.storage_calls import between_attempts, guarded

if TYPE_CHECKING:
    import optuna

__all__ = ["GatewaySlots", "take_gateway"]

_POLL_S = 1.0  # while the supervisor waits out an outage: how often the wait is looked at


def take_gateway() -> Any | None:
    """This worker's storage through its supervisor, if it was given one (``FD_ENV``); the
    descriptor is kept from anything a trial starts."""
    fd_text = os.environ.pop(FD_ENV, None)
    if fd_text is None or not fd_text.isdigit():
        return None
    fd = int(fd_text)
    os.set_inheritable(fd, False)  # an exec'd child does not get it
    client = _client_class()(Connection(fd))
    # a forked one (a data loader's worker) closes its copy: it would keep the supervisor's
    # thread waiting after this worker's exit, and its calls would cross this worker's
    os.register_at_fork(after_in_child=client.close)
    return client


class _Client:
    """The calls themselves; a mixin of the ``BaseStorage`` subclass built below."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()  # one call at a time: the objective may use threads
        self._seq = 0
        # user attributes to send with the state that finishes the trial (set_closing_attrs)
        self.closing_attrs: dict[int, dict[str, Any]] = {}

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self._seq += 1
            seq = self._seq
            call = pickle.dumps((name, args, kwargs))  # one that cannot pickle is not sent
            try:
                self._conn.send((seq, call))
                kind, payload = self._answer(seq)
            except (OSError, EOFError) as exc:
                raise StorageError(
                    f"the supervisor serving this worker's storage is gone ({exc!r})"
                ) from None
        if kind == ERROR:
            raise payload
        return payload

    def _answer(self, seq: int) -> tuple[str, Any]:
        """Read answers up to call ``seq``'s own (those of calls given up are skipped)."""
        retrying = False
        while True:
            if retrying:
                try:
                    with between_attempts():  # an interrupt gives the call up now
                        while not self._conn.poll(_POLL_S):
                            pass
                except BaseException:
                    self._conn.send((CANCEL, seq))
                    self._last_answer(seq)  # given up between attempts, or done in one
                    raise
            kind, answered, payload = self._conn.recv()
            if answered != seq:
                continue
            if kind == RETRYING:
                retrying = True
                continue
            if kind not in (OK, ERROR):
                raise StorageError(f"the supervisor answered {kind!r}")
            return kind, payload

    def _last_answer(self, seq: int) -> None:
        """Wait for the end of call ``seq``, given up: at most one attempt away."""
        while True:
            kind, answered, _ = self._conn.recv()
            if answered == seq and kind in (OK, ERROR, CANCELLED):
                return

    def close(self) -> None:
        self._conn.close()

    # -- what optguard's own steps ask: one call each (optguard.gateway.server) ------------
    def set_trial_user_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
        self.call("set_trial_user_attrs", trial_id, attrs)

    def set_trial_state_values(self, trial_id: int, state: Any, values: Any = None) -> bool:
        attrs = self.closing_attrs.pop(trial_id, None) if state.is_finished() else None
        return bool(self.call("set_trial_state_values", trial_id, state, values, attrs))

    # -- the supervisor beats for its workers' trials --------------------------------------
    def get_heartbeat_interval(self) -> None:
        return None

    def get_heartbeat_stale_trial_callback(self) -> None:
        return None


def _forward(name: str) -> Callable[..., Any]:
    def method(self: _Client, *args: Any, **kwargs: Any) -> Any:
        return self.call(name, *args, **kwargs)

    method.__name__ = name
    return method


@functools.cache
def _client_class() -> type:
    """The ``BaseStorage`` (built on first use: importing optguard does not import Optuna)
    whose storage methods are calls to the gateway, each one storage call."""
    from optuna.storages import BaseStorage

    namespace: dict[str, Any] = {name: _forward(name) for name in STORAGE_METHODS}
    namespace.update((name, value) for name, value in vars(_Client).items() if callable(value))
    namespace["call"] = guarded(_Client.call)
    namespace["__doc__"] = "A storage whose calls the supervisor's gateway answers."
    namespace["__module__"] = __name__
    return type(BaseStorage)("GatewayStorage", (BaseStorage,), namespace)


class GatewaySlots:
    """``TrialSlots`` for a worker whose supervisor claims for it (one call a claim)."""

    def __init__(self, storage: Any, study_name: str) -> None:
        self._storage = storage
        self._study_id = storage.get_study_id_from_name(study_name)

    @property
    def storage(self) -> Any:
        return self._storage

    @property
    def study_id(self) -> int:
        return self._study_id

    def claim(
        self, study: "optuna.Study", n_trials: int | None, owner: dict[str, Any]
    ) -> "optuna.trial.Trial | None":
        from optguard.ownership import adopt

        claimed = self._storage.call("claim", n_trials, owner)
        return None if claimed is None else adopt(study, *claimed)

    def count_trials(self) -> int:
        return int(self._storage.call("count_trials"))

    def close(self) -> None:
        self._storage.close()
