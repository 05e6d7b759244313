"""The supervisor's periodic storage work (stop and cancel requests, heartbeats and reaping,
progress) in a thread of its own, when the supervisor is its workers' gateway.

The host then has two pooled connections, which its workers' calls also wait their turn for:
a worker's call held by the database (a row lock, a slow query, an outage's attempt) would
hold the loop that samples memory, escalates kills and passes signals on. The loop only
reads what this thread last found; it never waits for the database on a timer.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

__all__ = ["Poller"]

_log = logging.getLogger("optguard.supervisor")
TICK_S = 0.1


class Poller:
    """Runs each ``(interval_s, job)`` every ``interval_s`` seconds until ``stop``. The first
    exception a job raises ends the thread and is kept in ``error`` for the loop to raise."""

    def __init__(self, jobs: list[tuple[float, Callable[[], object]]]) -> None:
        self._jobs = jobs
        self._done = [0.0] * len(jobs)
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="optguard-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, wait_s: float = 5.0) -> None:
        """Stop after the job under way (bounded: a call stuck in the database is left to
        its daemon thread)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(wait_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            for i, (interval, job) in enumerate(self._jobs):
                now = time.monotonic()
                if now - self._done[i] < interval or self._stop.is_set():
                    continue
                self._done[i] = now
                try:
                    job()
                except BaseException as exc:  # deliberately broad: the loop raises it
                    _log.debug("storage poller stopped by %r", exc)
                    self.error = exc
                    return
            self._stop.wait(TICK_S)
