"""The guard's evidence on a trial, as Optuna artifacts that optuna-dashboard lists on the
trial's page: the memory timeline of the worker's process tree (CSV, and an SVG chart with
the limit drawn) and the trial's log lines.

Artifacts are trial system attributes, which Optuna writes only while the trial is RUNNING:
whoever finishes the trial attaches them just before (the worker before its tell, the
supervisor before marking a trial whose worker it killed or lost). A store that cannot be
written costs the evidence, never the trial: a warning is logged instead.
"""

from __future__ import annotations

import io
import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optguard.artifacts import record_artifact

if TYPE_CHECKING:
    import optuna

    from optguard.limits import Limits

__all__ = ["attach_evidence", "store_evidence", "trial_log_lines", "MAX_LOG_BYTES"]

MAX_LOG_BYTES = 1 << 20  # of the worker's log read for one trial's lines
MAX_LINES = 1000  # the last ones kept
_MIME = {".csv": "text/csv", ".svg": "image/svg+xml", ".log": "text/plain"}


def trial_log_lines(log_path: Path, number: int, offset: int | None = None) -> list[str]:
    """Trial ``number``'s lines in its worker's log (the worker's and the supervisor's), from
    ``offset`` (where the log ended when the trial began), else from the log's last
    ``MAX_LOG_BYTES``. Each worker log holds one study and trial numbers are unique in it."""
    marker = f" trial={number} "
    try:
        with open(log_path, "rb") as fh:
            size = fh.seek(0, 2)
            start = offset if offset is not None else 0
            fh.seek(max(start, size - MAX_LOG_BYTES))
            data = fh.read()
    except OSError:  # no log to read: the evidence has the timeline only
        return []
    lines = [line for line in data.decode(errors="replace").splitlines() if marker in line]
    return lines[-MAX_LINES:]


def _timeline_svg(
    number: int, points: list[tuple[float, int]], limit_bytes: int | None, timeout_s: float | None
) -> str:
    from optguard.limits import format_against
    from optguard.report_html import OUTCOMES, fmt_mb, svg_chart

    series = [{
        "label": "memory of the worker's process tree",
        "colour": OUTCOMES["complete"][1],
        "line": True,
        "points": [(t, v / 1e6, f"{t:.1f} s: {fmt_mb(v / 1e6)}") for t, v in points],
    }]  # fmt: skip
    limit = None
    if limit_bytes is not None:
        shown = format_against(limit_bytes, limit_bytes, "size")[1]
        limit = (limit_bytes / 1e6, f"limit: --max-rss {shown}")
    x_limit = None
    if timeout_s is not None and points and points[-1][0] >= timeout_s * 0.5:  # else squashed
        shown = format_against(timeout_s, timeout_s, "duration")[1]
        x_limit = (timeout_s, f"limit: --timeout {shown}")
    return svg_chart(
        f"Trial #{number}: memory over the trial",
        "memory (MB)",
        fmt_mb,
        series,
        limit=limit,
        x_label="seconds since the trial started",
        standalone=True,
        x_limit=x_limit,
    )


def attach_evidence(
    store: Any,
    storage: "optuna.storages.BaseStorage | None",
    trial: "optuna.trial.Trial | optuna.trial.FrozenTrial",
    points: list[tuple[float, int]],
    limits: "Limits",
    lines: list[str],
    log: logging.Logger,
) -> int:
    """Upload ``trial``'s timeline and log lines to ``store``; how many files were attached.
    ``storage``: ``None`` for a ``Trial`` (its own), the storage of a ``FrozenTrial``. Each
    file is written before its record (``artifacts.record_artifact``). Storage errors
    propagate as from any other write; a store's ``OSError`` is logged."""
    if storage is None:
        storage = trial.storage  # type: ignore[union-attr]  # a Trial's own

    number = trial.number
    files = {f"trial-{number}-guard.log": "\n".join(lines) + "\n"}
    if points:
        rows = [f"{t:.3f},{v / 1e6:.1f}" for t, v in points]
        files[f"trial-{number}-memory.csv"] = "elapsed_s,memory_mb\n" + "\n".join(rows) + "\n"
        files[f"trial-{number}-memory.svg"] = _timeline_svg(
            number, points, limits.max_rss_bytes, limits.timeout_s
        )
    attached = 0
    for name, text in files.items():
        artifact_id = str(uuid.uuid4())
        try:
            # UTF-8 whatever the locale: the log lines may hold any error message
            store.write(artifact_id, io.BytesIO(text.encode("utf-8", errors="replace")))
        except OSError as exc:  # a full or unwritable store: the trial goes on without it
            log.warning("Trial #%d: evidence %s not stored: %s", number, name, exc)
            continue
        record_artifact(storage, trial._trial_id, artifact_id, name, _MIME[Path(name).suffix])
        attached += 1
    return attached


def store_evidence(
    directory: Path,
    storage: "optuna.storages.BaseStorage | None",
    trial: "optuna.trial.Trial | optuna.trial.FrozenTrial",
    points: list[tuple[float, int]],
    limits: "Limits",
    lines: list[str],
    log: logging.Logger,
) -> Exception | None:
    """``attach_evidence`` to the store in ``directory``, best effort, for whoever finishes
    the trial: returns what kept the evidence from being stored (the caller logs it), else
    ``None``. A storage error propagates as from any other write, and so does
    ``UpdateFinishedTrialError`` (the trial was finished meanwhile: the caller's concern)."""
    from optuna.exceptions import UpdateFinishedTrialError

    from optguard.artifacts import open_store
    from optguard.outage import is_storage_error

    try:
        attach_evidence(open_store(directory), storage, trial, points, limits, lines, log)
    except UpdateFinishedTrialError:
        raise
    except Exception as exc:
        if is_storage_error(exc):
            raise
        return exc  # a store that cannot be created, an odd log: the evidence only is lost
    return None
