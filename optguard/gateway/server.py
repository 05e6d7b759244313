"""The supervisor's side: one thread per worker runs that worker's storage calls, in order,
on the supervisor's storage (a pool of two connections) and its study-wide lock.

The calls are the ones the worker would have made itself, with the same outage handling,
so what a worker sees (results, Optuna's errors, ``StorageError`` past ``--storage-outage``)
does not change; only where the connection lives does.
"""

from __future__ import annotations

import functools
import logging
import pickle
import socket
import threading
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Callable

from optguard.errors import StorageError
from optguard.gateway.cache import TrialCache
from optguard.gateway.protocol import (
    CANCEL,
    CANCELLED,
    ERROR,
    OK,
    OPERATIONS,
    RETRYING,
    STORAGE_METHODS,
    portable,
)
from optguard.outage import waiting_with

if TYPE_CHECKING:
    from optguard.storage import TrialSlots

__all__ = ["Gateway", "Served"]

_log = logging.getLogger("optguard.gateway")


class _Abandoned(BaseException):
    """The worker gave up the call it waits for (an interrupt during an outage): not an
    ``Exception``, so that no handler on the way takes it for the call's own error."""


class Served(threading.Thread):
    """The thread serving one worker. ``call`` names the call it runs now (``None``
    between calls): the supervisor judges a dead worker only once a claim it left has
    ended (the thread gives back what it claimed for a worker that is gone), and waits
    a while for any other call, which the trial's record depends on."""

    def __init__(self, serve: Callable[[Served], None], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._serve = serve
        self.call: str | None = None

    def run(self) -> None:
        self._serve(self)


class Gateway:
    """Serves the storage calls of the workers of one run, on ``slots.storage``."""

    def __init__(self, slots: TrialSlots) -> None:
        self._slots = slots
        self._storage: Any = slots.storage
        self._trials = TrialCache(slots.storage, slots.study_id)
        self._ops: dict[str, Callable[..., Any]] = {
            "claim": slots.claim_row,
            "set_trial_user_attrs": self._set_trial_user_attrs,
            "set_trial_state_values": self._set_trial_state_values,
            "count_trials": slots.count_trials,
        }
        if set(self._ops) != OPERATIONS:
            raise RuntimeError("the gateway's operations and its protocol disagree")

    def connect(self, name: str) -> tuple[socket.socket, Served]:
        """A new worker's end of a socket pair, and the thread that serves it from now on,
        which ends once the worker closed its end (it exited) and its last call is done."""
        ours, theirs = socket.socketpair()
        conn = Connection(ours.detach())
        served = Served(functools.partial(self._serve, conn), f"optguard-gateway-{name}")
        served.start()
        return theirs, served

    def _serve(self, conn: Connection, served: Served) -> None:
        try:
            while True:
                message = conn.recv()
                if message[0] == CANCEL:
                    continue  # given up after its answer was sent: nothing left to stop
                seq, call = message
                try:
                    name, args, kwargs = pickle.loads(call)
                except Exception as exc:  # deliberately broad: any unpickling error
                    conn.send((ERROR, seq, TypeError(f"the supervisor cannot read {exc}")))
                    continue
                served.call = name
                try:
                    with waiting_with(functools.partial(self._wait, conn, seq, [False])):
                        answer = (OK, seq, self._dispatch(name, args, kwargs))
                except _Abandoned:
                    answer = (CANCELLED, seq, None)
                except Exception as exc:  # deliberately broad: the worker raises it again
                    answer = (ERROR, seq, portable(exc))
                try:
                    self._send(conn, answer, name, args)
                finally:
                    served.call = None
        except (EOFError, OSError):
            pass  # the worker exited (or died): its calls are over
        finally:
            conn.close()

    def _send(self, conn: Connection, answer: tuple[str, int, Any], name: str, args: Any) -> None:
        """Answer a call; a claim whose worker is gone (it died while the claim waited)
        gives its trial back, or the trial would stay RUNNING for a dead process after the
        supervisor had judged that worker."""
        kind, seq, result = answer
        try:
            conn.send(answer)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            # a result that does not pickle: nothing was written, say why instead
            conn.send((ERROR, seq, StorageError(f"cannot send the result: {exc}")))
        except OSError:
            if name == "claim" and kind == OK and result is not None:
                self._give_back(result[0], args[1])
            raise

    def _give_back(self, trial_id: int, owner: dict[str, Any]) -> None:
        try:
            if self._slots.give_back(trial_id, owner):
                _log.warning("gateway: trial id %d given back: its worker died during the claim",
                             trial_id)  # fmt: skip
        except Exception as exc:  # deliberately broad: logged here, not lost in a thread
            # left RUNNING for a dead process: the supervisor then judges it, or a restart
            _log.warning("gateway: cannot give trial id %d back: %r", trial_id, exc)

    def _wait(self, conn: Connection, seq: int, told: list[bool], seconds: float) -> None:
        """Between two attempts of call ``seq`` through an outage: tell the worker once, then
        wait, ending the call if the worker gives it up (its interrupt is not held for the
        whole outage, as when it called the storage itself)."""
        if not told[0]:
            told[0] = True
            conn.send((RETRYING, seq, None))
        if conn.poll(seconds):
            message = conn.recv()
            if message == (CANCEL, seq):
                raise _Abandoned
            _log.warning("gateway: unexpected message during call %d: %r", seq, message[:1])

    def _dispatch(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        op = self._ops.get(name)
        if op is not None:
            return op(*args, **kwargs)
        if name not in STORAGE_METHODS:
            raise ValueError(f"not a storage call: {name!r}")
        if name == "_get_trials":  # what a worker's Optuna cache lacks, from the host's copy
            return self._trials.get_trials(*args, **kwargs)
        return getattr(self._storage, name)(*args, **kwargs)

    def _set_trial_user_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
        from optguard.storage import set_trial_user_attrs

        set_trial_user_attrs(self._storage, trial_id, attrs)

    def _set_trial_state_values(
        self, trial_id: int, state: Any, values: Any, attrs: dict[str, Any] | None
    ) -> bool:
        """The worker's finish, with the attributes it had held for it (``closing_attrs``):
        one transaction, as in the worker's own storage."""
        from optguard.storage import set_closing_attrs

        if attrs:
            set_closing_attrs(self._storage, trial_id, attrs)
        return bool(self._storage.set_trial_state_values(trial_id, state, values))
