"""``optguard report``: what happened in a study, from its storage alone (no logs needed).

The JSON form is a stable document; its keys are listed in the README. Names are added, never
renamed, like the trial attributes it reads.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optguard.errors import UsageError

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

__all__ = ["build_report", "write_plot", "LIMITS_ATTR"]

A = "optguard."
LIMITS_ATTR = "optguard.limits"  # on the study: the limits of the last `optguard run`
GUARD_REASONS = ("timeout", "memory", "system_memory")
LEAK_MB_PER_TRIAL = 1.0  # a worker whose final memory grows faster than this is flagged
TOP = 5


def _duration(t: "FrozenTrial") -> float | None:
    if t.datetime_start is None or t.datetime_complete is None:
        return None
    return (t.datetime_complete - t.datetime_start).total_seconds()


def _mb(nbytes: Any) -> float | None:
    return None if nbytes is None else round(nbytes / 1e6, 1)


def _slope(ys: list[float]) -> float:
    """Least-squares growth per step."""
    n = len(ys)
    mean_x, mean_y = (n - 1) / 2, sum(ys) / n
    den = sum((x - mean_x) ** 2 for x in range(n))
    return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(ys)) / den if den else 0.0


def _memory_trend(trials: list["FrozenTrial"]) -> dict[str, Any]:
    by_worker: dict[str, list[FrozenTrial]] = defaultdict(list)
    for t in trials:
        if A + "final_rss_bytes" in t.user_attrs and A + "worker" in t.user_attrs:
            by_worker[str(t.user_attrs[A + "worker"])].append(t)
    trend = {}
    for worker, items in sorted(by_worker.items()):
        items.sort(key=lambda t: t.number)
        final_mb = [t.user_attrs[A + "final_rss_bytes"] / 1e6 for t in items]
        slope = _slope(final_mb) if len(final_mb) >= 2 else 0.0
        rises = sum(b > a for a, b in zip(final_mb, final_mb[1:]))
        leak = len(final_mb) >= 5 and slope > LEAK_MB_PER_TRIAL and rises >= 0.7 * (len(final_mb) - 1)
        trend[worker] = {
            "trials": [t.number for t in items],
            "final_mb": [round(v, 1) for v in final_mb],
            "growth_mb_per_trial": round(slope, 2),
            "leak": leak,
        }
    return trend


def _bucket(value: Any, edges: list[float] | None) -> str:
    if edges is None:
        return str(value)
    for low, high in zip(edges, edges[1:]):
        if value <= high:
            return f"[{low:.3g}, {high:.3g}]"
    return f"[{edges[-2]:.3g}, {edges[-1]:.3g}]"


def _patterns(trials: list["FrozenTrial"]) -> list[dict[str, Any]]:
    """Parameter values (or float ranges) over-represented among guard prunes."""
    from optuna.trial import TrialState

    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    found = []
    names = sorted({name for t in trials for name in t.params})
    for reason in GUARD_REASONS:
        pruned = [t for t in trials if t.user_attrs.get(A + "reason") == reason]
        if len(pruned) < 2:
            continue
        for name in names:
            values = [t.params[name] for t in trials if name in t.params]
            edges = None
            if all(isinstance(v, float) for v in values) and len(set(values)) > 4:
                qs = statistics.quantiles(values, n=4)
                edges = [min(values), *qs, max(values)]
            p_counts = Counter(_bucket(t.params[name], edges) for t in pruned if name in t.params)
            c_counts = Counter(_bucket(t.params[name], edges) for t in completed if name in t.params)
            for value, k in p_counts.items():
                c = c_counts.get(value, 0)
                p_share = k / len(pruned)
                c_share = c / len(completed) if completed else 0.0
                if p_share >= 0.5 and p_share >= 2 * c_share:
                    found.append({
                        "param": name, "value": value, "reason": reason,
                        "pruned": k, "pruned_total": len(pruned),
                        "completed": c, "completed_total": len(completed),
                        "text": f"{name}={value}: {k} of {len(pruned)} {reason} prunes, "
                                f"{c} of {len(completed)} completed",
                    })  # fmt: skip
    return found


def build_report(study: str, storage_url: str | None) -> dict[str, Any]:
    """The report as a JSON-ready dict; raises ``UsageError`` for an unknown study."""
    import optuna

    from optguard.storage import mask_url, open_existing_study

    url, storage, _ = open_existing_study(study, storage_url)
    loaded = optuna.load_study(study_name=study, storage=storage)
    trials = loaded.get_trials(deepcopy=False)
    limits = loaded.user_attrs.get(LIMITS_ATTR) or {}
    states = Counter(t.state.name for t in trials)
    reasons = Counter(
        str(t.user_attrs[A + "reason"]) for t in trials if A + "reason" in t.user_attrs
    )
    retries = [t for t in trials if A + "retry_of" in t.user_attrs]
    tags: dict[str, Counter[str]] = defaultdict(Counter)
    for t in trials:
        tags[str(t.user_attrs.get(A + "tag", "(none)"))][t.state.name] += 1
    timed = [(t, d) for t in trials if (d := _duration(t)) is not None]
    timed.sort(key=lambda td: td[1], reverse=True)

    def row(t: "FrozenTrial", **extra: Any) -> dict[str, Any]:
        return {"trial": t.number, "state": t.state.name, **extra}

    closest: dict[str, list[dict[str, Any]]] = {"timeout": [], "memory": []}
    if limits.get("timeout_s"):
        closest["timeout"] = [
            row(t, duration_s=round(d, 3), fraction=round(d / limits["timeout_s"], 3))
            for t, d in timed[:TOP]
        ]
    if limits.get("max_rss_bytes"):
        peaks = [(t, t.user_attrs[A + "peak_rss_bytes"]) for t in trials
                 if A + "peak_rss_bytes" in t.user_attrs]  # fmt: skip
        peaks.sort(key=lambda tp: tp[1], reverse=True)
        closest["memory"] = [
            row(t, peak_mb=round(p / 1e6, 1), fraction=round(p / limits["max_rss_bytes"], 3))
            for t, p in peaks[:TOP]
        ]
    best = None
    if states.get("COMPLETE"):
        best = {"trial": loaded.best_trial.number, "value": loaded.best_value}
    return {
        "study": study,
        "storage": mask_url(url),
        "direction": loaded.direction.name.lower(),
        "trials": len(trials),
        "states": dict(sorted(states.items())),
        "guard_prunes": dict(sorted(reasons.items())),
        "hard_kills": sum(bool(t.user_attrs.get(A + "hard_kill")) for t in trials),
        "retries": {
            "count": len(retries),
            "outcomes": dict(Counter(t.state.name for t in retries)),
            "trials": [row(t, retry_of=t.user_attrs[A + "retry_of"]) for t in retries],
        },
        "tags": {tag: dict(c) for tag, c in sorted(tags.items())},
        "memory_trend": _memory_trend(trials),
        "patterns": _patterns(trials),
        "slowest": [row(t, duration_s=round(d, 3)) for t, d in timed[:TOP]],
        "closest_to_limits": closest,
        "limits": limits,
        "best": best,
        "points": [
            {
                "trial": t.number,
                "state": t.state.name,
                "duration_s": _duration(t),
                "final_mb": _mb(t.user_attrs.get(A + "final_rss_bytes")),
                "peak_mb": _mb(t.user_attrs.get(A + "peak_rss_bytes")),
            }
            for t in trials
        ],
    }


_COLORS = {"COMPLETE": "#2a9d8f", "PRUNED": "#e9c46a", "FAIL": "#e76f51", "RUNNING": "#457b9d"}


def _svg_chart(title: str, points: list[tuple[int, float | None, str]], limit: float | None,
               unit: str) -> str:  # fmt: skip
    width, height, pad = 640, 260, 40
    points = [(x, y, state) for x, y, state in points if y is not None]
    ys = [y for _, y, _ in points] + ([limit] if limit else [])
    xs = [x for x, _, _ in points] or [0]
    top = max(ys or [1.0]) * 1.1 or 1.0
    span = max(max(xs) - min(xs), 1)

    def px(x: float) -> float:
        return pad + (x - min(xs)) / span * (width - 2 * pad)

    def py(y: float) -> float:
        return height - pad - y / top * (height - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
             f'<text x="{pad}" y="20" font-family="sans-serif" font-size="14">{title}</text>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
             'stroke="#999"/>',
             f'<text x="4" y="{pad}" font-size="11">{top:.3g} {unit}</text>']  # fmt: skip
    if limit:
        parts.append(f'<line x1="{pad}" y1="{py(limit):.1f}" x2="{width - pad}" '
                     f'y2="{py(limit):.1f}" stroke="red" stroke-dasharray="4"/>')  # fmt: skip
    for x, y, state in points:
        if y is not None:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" '
                         f'fill="{_COLORS.get(state, "#666")}"><title>#{x} {state} '
                         f'{y:.3g} {unit}</title></circle>')  # fmt: skip
    parts.append("</svg>")
    return "\n".join(parts)


def _unwritable(path: Path, exc: OSError) -> UsageError:
    return UsageError(f"--plot: cannot write {path}: {exc.strerror or exc}")


def _check_plot_directory(path: Path) -> None:
    """Before drawing: a missing directory is a typo, not a reason for a traceback."""
    directory = path.parent
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise UsageError(f"--plot: cannot write {path}: directory {directory} {what}")


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Final and peak memory per trial against the limit, duration against the time limit,
    one point per trial coloured by state: ``.html`` (no dependency) or ``.png`` (matplotlib)."""
    limits = report["limits"]
    mem_limit = limits.get("max_rss_bytes", 0) / 1e6 or None
    time_limit = limits.get("timeout_s")
    pts = report["points"]
    series = [
        ("Final memory per trial", "final_mb", mem_limit, "MB"),
        ("Peak memory per trial", "peak_mb", mem_limit, "MB"),
        ("Trial duration", "duration_s", time_limit, "s"),
    ]
    suffix = path.suffix.lower()
    _check_plot_directory(path)
    if suffix == ".html":
        charts = [
            _svg_chart(title, [(p["trial"], p[key], p["state"]) for p in pts], limit, unit)
            for title, key, limit, unit in series
        ]  # fmt: skip
        try:
            path.write_text(
                f"<!doctype html><html><head><meta charset='utf-8'><title>optguard report: "
                f"{report['study']}</title></head><body>\n" + "\n".join(charts)
                + "\n</body></html>\n",
                encoding="utf-8",
            )  # fmt: skip
        except OSError as exc:
            raise _unwritable(path, exc) from None
        return
    if suffix != ".png":
        raise UsageError(f"--plot: {path.name} must end in .png or .html")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot FILE.png needs matplotlib: pip install 'optguard[plot]'") from None
    fig, axes = plt.subplots(len(series), 1, figsize=(8, 9), sharex=True)
    for ax, (title, key, limit, unit) in zip(axes, series):
        for state, color in _COLORS.items():
            chosen = [p for p in pts if p["state"] == state and p[key] is not None]
            ax.scatter([p["trial"] for p in chosen], [p[key] for p in chosen], s=12,
                       color=color, label=state)  # fmt: skip
        if limit:
            ax.axhline(limit, color="red", linestyle="--", label="limit")
        ax.set_title(title)
        ax.set_ylabel(unit)
    axes[0].legend(loc="upper left", fontsize=8)
    axes[-1].set_xlabel("trial")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=80)
    except OSError as exc:
        raise _unwritable(path, exc) from None
    finally:
        plt.close(fig)
