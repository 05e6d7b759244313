"""``optguard report``: what happened in a study, from its storage alone (no logs needed).

The JSON form is a stable document; its keys are listed in the README. Names are added, never
renamed, like the trial attributes it reads.
"""

from __future__ import annotations

import itertools
import math
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
GUARD_REASONS = ("timeout", "memory", "system_memory", "gpu_memory")
# A worker's final memory (after the post-trial cleanup) leaks when it grew by at least
# LEAK_MIN_MB from its first trial to its last, and either by LEAK_MIN_FRACTION of the first
# (a step: 369 -> 1620 MB at once) or steadily (> LEAK_MB_PER_TRIAL, rising at 70% of 5+ steps,
# no step half of the growth). A creep of 0.1 MB/trial is no leak.
LEAK_MIN_MB = 50.0
LEAK_MIN_FRACTION = 0.25
LEAK_MB_PER_TRIAL = 1.0
LEAK_RULE = (
    f"final memory after cleanup grew at least {LEAK_MIN_MB:g} MB from the worker's first "
    f"trial to its last, and by at least {LEAK_MIN_FRACTION:.0%} of the first or by more than "
    f"{LEAK_MB_PER_TRIAL:g} MB/trial rising at 70% of steps over 5+ trials, no one step "
    f"half of the growth"
)
# Patterns: a value is flagged when a one-sided Fisher exact test says its trials end for a
# guard reason more often than the others, Bonferroni-corrected over all the tests that could
# have flagged something, and at least PATTERN_MIN_PRUNES of them did.
PATTERN_ALPHA = 0.01
PATTERN_MIN_PRUNES = 3
PATTERN_MAX_CATEGORIES = 6  # a numeric parameter with more distinct values is cut in quartiles
TOP = 5


def _duration(t: "FrozenTrial") -> float | None:
    """Seconds from start to end. Optuna hands out naive *local* times: subtracting them is
    an hour off across a daylight-saving change, their epoch seconds are not (but for a start
    in the repeated autumn hour, which naive local time cannot tell apart)."""
    if t.datetime_start is None or t.datetime_complete is None:
        return None
    return t.datetime_complete.timestamp() - t.datetime_start.timestamp()


def _mb(nbytes: Any) -> float | None:
    return None if nbytes is None else round(nbytes / 1e6, 1)


def _slope(ys: list[float]) -> float:
    """Least-squares growth per step."""
    n = len(ys)
    mean_x, mean_y = (n - 1) / 2, sum(ys) / n
    den = sum((x - mean_x) ** 2 for x in range(n))
    return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(ys)) / den if den else 0.0


def is_leak(final_mb: list[float]) -> bool:
    """``LEAK_RULE`` on one worker's final memory per trial, in MB, in trial order: a growth
    that stays (a step counts as much as a ramp), never a creep of a few MB."""
    if len(final_mb) < 2:
        return False
    growth = final_mb[-1] - final_mb[0]
    if growth < LEAK_MIN_MB:
        return False
    if growth >= LEAK_MIN_FRACTION * final_mb[0]:
        return True
    steps = [b - a for a, b in itertools.pairwise(final_mb)]
    return (  # steady: not one warm-up step (under the fraction) followed by noise
        len(final_mb) >= 5
        and _slope(final_mb) > LEAK_MB_PER_TRIAL
        and sum(step > 0 for step in steps) >= 0.7 * len(steps)
        and max(steps) < 0.5 * growth
    )


def _by_worker(trials: list["FrozenTrial"]) -> dict[str, list["FrozenTrial"]]:
    """Trials with a recorded final memory, per worker, in trial order."""
    by_worker: dict[str, list[FrozenTrial]] = defaultdict(list)
    for t in trials:
        if A + "final_rss_bytes" in t.user_attrs and A + "worker" in t.user_attrs:
            by_worker[str(t.user_attrs[A + "worker"])].append(t)
    for items in by_worker.values():
        items.sort(key=lambda t: t.number)
    return dict(sorted(by_worker.items()))


def _memory_trend(trials: list["FrozenTrial"]) -> dict[str, Any]:
    trend = {}
    for worker, items in _by_worker(trials).items():
        final_mb = [t.user_attrs[A + "final_rss_bytes"] / 1e6 for t in items]
        slope = _slope(final_mb) if len(final_mb) >= 2 else 0.0
        trend[worker] = {
            "trials": [t.number for t in items],
            "final_mb": [round(v, 1) for v in final_mb],
            "growth_mb_per_trial": round(slope, 2),
            "growth_mb": round(final_mb[-1] - final_mb[0], 1),
            "leak": is_leak(final_mb),
        }
    return trend


def started_leaking(trials: list["FrozenTrial"]) -> set[int]:
    """Trials that started on a worker whose final memory already stood a leak above its
    first trial's (``LEAK_MIN_MB`` and ``LEAK_MIN_FRACTION``): a memory prune there is the
    worker's doing (a cascade), whatever the trial's parameters."""
    found = set()
    for items in _by_worker(trials).values():
        first = items[0].user_attrs[A + "final_rss_bytes"] / 1e6
        for before, t in itertools.pairwise(items):
            growth = before.user_attrs[A + "final_rss_bytes"] / 1e6 - first
            if growth >= max(LEAK_MIN_MB, LEAK_MIN_FRACTION * first):
                found.add(t.number)
    return found


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_greater(k: int, n_value: int, k_total: int, n_total: int) -> float:
    """One-sided Fisher exact test: the chance that ``n_value`` trials drawn from
    ``n_total``, of which ``k_total`` ended for the reason, hold ``k`` or more of those
    (the hypergeometric upper tail, summed in logs: fast, to about 1e-10 relative, any size)."""
    low = max(k, 0, n_value + k_total - n_total)
    top = min(n_value, k_total)
    if low > top:
        return 0.0
    logs = [
        _log_comb(k_total, low)
        + _log_comb(n_total - k_total, n_value - low)
        - _log_comb(n_total, n_value)
    ]
    for i in range(low, top):  # term(i + 1) / term(i)
        ratio = (k_total - i) * (n_value - i) / ((i + 1) * (n_total - k_total - n_value + i + 1))
        logs.append(logs[-1] + math.log(ratio))
    peak = max(logs)
    return min(1.0, math.exp(peak) * math.fsum(math.exp(v - peak) for v in logs))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bucket(value: Any, edges: list[float] | None) -> str:
    if edges is None:
        return str(value)
    for low, high in zip(edges, edges[1:]):
        if value <= high:
            return f"[{low:.3g}, {high:.3g}]"
    return f"[{edges[-2]:.3g}, {edges[-1]:.3g}]"


def _edges(values: list[Any]) -> list[float] | None:
    """Quartile edges for a numeric parameter with many distinct values, else None (each
    value is its own category)."""
    if len(set(values)) <= PATTERN_MAX_CATEGORIES or not all(_is_number(v) for v in values):
        return None
    edges = sorted({min(values), *statistics.quantiles(values, n=4), max(values)})
    return edges if len(edges) >= 2 else None


def find_patterns(trials: list["FrozenTrial"]) -> tuple[list[dict[str, Any]], int]:
    """Parameter values (or quartile ranges of numbers) whose trials end for a guard reason
    more often than the others' (``pattern_rule``), and the number of tests made.

    For each reason and each value: a 2x2 table of the completed trials and those ended for
    that reason, with the value or not. Memory prunes of trials that started on a worker
    already leaking (``started_leaking``) are set aside: they say nothing of the parameters."""
    from optuna.trial import TrialState

    cascade = started_leaking(trials)
    names = sorted({name for t in trials for name in t.params})
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    cells = []  # (reason, name, value, k, c, k_total, n_total, set_aside): margins fixed
    for reason in GUARD_REASONS:
        ended, aside = [], []
        for t in trials:
            if t.user_attrs.get(A + "reason") == reason:
                (aside if reason == "memory" and t.number in cascade else ended).append(t)
        if len(ended) < PATTERN_MIN_PRUNES:
            continue
        for name in names:
            edges = _edges([t.params[name] for t in ended + completed if name in t.params])
            p_counts = Counter(_bucket(t.params[name], edges) for t in ended if name in t.params)
            c_counts = Counter(
                _bucket(t.params[name], edges) for t in completed if name in t.params
            )
            k_total = sum(p_counts.values())
            n_total = k_total + sum(c_counts.values())
            set_aside = sum(name in t.params for t in aside)
            for value in sorted(set(p_counts) | set(c_counts)):
                k, c = p_counts.get(value, 0), c_counts.get(value, 0)
                if min(k + c, k_total) >= PATTERN_MIN_PRUNES:  # could reach the minimum
                    cells.append((reason, name, value, k, c, k_total, n_total, set_aside))
    tests = len(cells)
    found = []
    for reason, name, value, k, c, k_total, n_total, set_aside in cells:
        if k < PATTERN_MIN_PRUNES:
            continue
        p = fisher_greater(k, k + c, k_total, n_total)
        if p * tests >= PATTERN_ALPHA:
            continue
        aside = f" ({set_aside} more on a worker already leaking not counted)" if set_aside else ""
        found.append({
            "param": name, "value": value, "reason": reason,
            "pruned": k, "pruned_total": k_total,
            "completed": c, "completed_total": n_total - k_total,
            "p_value": p, "p_adjusted": min(1.0, p * tests), "tests": tests,
            "set_aside": set_aside,
            "text": f"{name}={value}: {k} of {k_total} {reason} prunes{aside}, "
                    f"{c} of {n_total - k_total} completed (Fisher p={p:.2g}, "
                    f"{tests} tests)",
        })  # fmt: skip
    found.sort(key=lambda row: row["p_value"])
    return found, tests


def pattern_rule(tests: int) -> str:
    return (
        f"Fisher's exact test, one-sided, p < {PATTERN_ALPHA:g} after Bonferroni over {tests} "
        f"tests (each value or quartile of each parameter, per guard reason), at least "
        f"{PATTERN_MIN_PRUNES} prunes with the value; memory prunes on a worker already "
        f"leaking are not counted"
    )


def _best_row(t: "FrozenTrial") -> dict[str, Any]:
    """A trial of ``study.best_trials`` (the Pareto front, feasible trials only when the
    objective sets constraints), with its values, parameters and constraints."""
    row: dict[str, Any] = {"trial": t.number, "values": t.values, "params": t.params}
    if t.constraints:
        row["constraints"] = t.constraints
    return row


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
    directions = [d.name.lower() for d in loaded.directions]
    patterns, pattern_tests = find_patterns(trials)
    best = None
    if len(directions) == 1 and states.get("COMPLETE"):
        try:
            best = {"trial": loaded.best_trial.number, "value": loaded.best_value}
        except ValueError:  # constrained: no complete trial is feasible
            best = None
    return {
        "study": study,
        "storage": mask_url(url),
        # one objective: its direction; several: null (see "directions")
        "direction": directions[0] if len(directions) == 1 else None,
        "directions": directions,
        "trials": len(trials),
        "states": dict(sorted(states.items())),
        "guard_prunes": dict(sorted(reasons.items())),
        # of those, the trials whose objective raised an out-of-memory error (no limit crossed)
        "out_of_memory": dict(sorted(Counter(
            str(t.user_attrs[A + "reason"]) for t in trials
            if A + "reason" in t.user_attrs and t.user_attrs.get(A + "enforcement") == "oom"
        ).items())),  # fmt: skip
        "hard_kills": sum(bool(t.user_attrs.get(A + "hard_kill")) for t in trials),
        "retries": {
            "count": len(retries),
            "outcomes": dict(Counter(t.state.name for t in retries)),
            "trials": [row(t, retry_of=t.user_attrs[A + "retry_of"]) for t in retries],
        },
        "tags": {tag: dict(c) for tag, c in sorted(tags.items())},
        "memory_trend": _memory_trend(trials),
        "leak_rule": LEAK_RULE,
        "patterns": patterns,
        "pattern_rule": pattern_rule(pattern_tests),
        "slowest": [row(t, duration_s=round(d, 3)) for t, d in timed[:TOP]],
        "closest_to_limits": closest,
        "limits": limits,
        "best": best,
        "best_trials": [_best_row(t) for t in loaded.best_trials],
        "points": [
            {
                "trial": t.number,
                "state": t.state.name,
                "duration_s": _duration(t),
                "final_mb": _mb(t.user_attrs.get(A + "final_rss_bytes")),
                "peak_mb": _mb(t.user_attrs.get(A + "peak_rss_bytes")),
                "reason": t.user_attrs.get(A + "reason"),
                # "oom": the objective ran out of memory, no limit was crossed
                "enforcement": t.user_attrs.get(A + "enforcement"),
                "peak_vram_mb": _mb(t.user_attrs.get(A + "peak_vram_bytes")),
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
