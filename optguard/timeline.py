"""A trial's memory over time, kept small however long the trial runs.

The supervisor samples each worker's process tree at 10 Hz. ``Timeline`` keeps the peak of
each interval; when it holds ``capacity`` points, neighbours merge pairwise (the larger
stays, at its own time) and the interval doubles, so a ten-hour trial keeps as many points as
a one-minute one, evenly spread, and its peak is never lost. The supervisor spools it to a
file the worker reads when the trial ends (``write_spool``/``read_spool``): the worker
attaches it to the trial before telling it (``optguard.evidence``).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path

__all__ = ["Timeline", "drop_spool", "read_spool", "spool_path", "write_spool", "SPOOL_EVERY_S"]

SPOOL_EVERY_S = 1.0  # how often the supervisor rewrites a running trial's spool
_SPOOL_DIR = ".timelines"


class Timeline:
    """At most ``capacity`` points ``(elapsed_s, bytes)``, the peak of each interval."""

    def __init__(self, capacity: int = 256, interval_s: float = 0.1) -> None:
        self.capacity = max(2, capacity)
        self.interval_s = interval_s
        self.points: list[tuple[float, int]] = []
        self._open: tuple[float, int] | None = None  # the peak of the interval not yet closed
        self._ends = -math.inf  # where the open interval ends

    def add(self, elapsed_s: float, value: int) -> None:
        if self._open is not None and elapsed_s >= self._ends:
            self.points.append(self._open)
            self._open = None
            if len(self.points) >= self.capacity:
                self._halve()
        if self._open is None:
            self._ends = (math.floor(elapsed_s / self.interval_s) + 1) * self.interval_s
            self._open = (elapsed_s, value)
        elif value > self._open[1]:
            self._open = (elapsed_s, value)

    def _halve(self) -> None:
        pts = self.points
        self.points = [max(pts[i : i + 2], key=lambda p: p[1]) for i in range(0, len(pts), 2)]
        self.interval_s *= 2
        if self._open is not None:
            self._ends = (math.floor(self._open[0] / self.interval_s) + 1) * self.interval_s

    def snapshot(self) -> list[tuple[float, int]]:
        """Every point so far, the open interval's peak included."""
        return self.points + ([self._open] if self._open is not None else [])


def spool_path(log_path: Path) -> Path:
    """Where the timeline of the trial running in the worker logging to ``log_path`` is
    spooled: beside the log, in a hidden directory that ``grep logs/*`` does not read."""
    return log_path.parent / _SPOOL_DIR / (log_path.stem + ".csv")


def _header(trial_id: int, started: float) -> str:
    # The trial's start (the worker's monotonic clock) with its id: an id alone repeats in a
    # study recreated under the same name, and its stale spool would pass for this trial's.
    return f"# trial_id {trial_id} started {started!r}"


def write_spool(
    path: Path, trial_id: int, started: float, points: list[tuple[float, int]]
) -> None:
    """Replace the spool at once (a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [_header(trial_id, started)] + [f"{t:.3f},{v}" for t, v in points]
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_spool(path: Path, trial_id: int, started: float) -> list[tuple[float, int]]:
    """The spooled points of the trial ``trial_id`` that began at ``started``; none if the
    spool is missing or of another trial (one shorter than ``SPOOL_EVERY_S``, or a worker run
    without a supervisor)."""
    try:
        text = path.read_text()
    except OSError:  # no spool yet: the caller has only the trial's own peak
        return []
    head, _, body = text.partition("\n")
    if head.strip() != _header(trial_id, started):
        return []
    points = []
    for line in body.splitlines():
        t, _, v = line.partition(",")
        try:
            points.append((float(t), int(v)))
        except ValueError:
            continue  # not a point: skipped, as a reader of a CSV would
    return points


def drop_spool(path: Path) -> None:
    """Remove the spool of a trial that has ended: nothing is left behind in ``logs/``."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
