"""``optguard monitor --analyze``: what a memory log says, for people and machines.

Reads the JSONL log of ``optguard monitor``: peaks and means, time at or above each
threshold, the RAM trend (a leak shows as a steady positive slope in MB per hour; none
from less than a minute of samples, too short to extrapolate to an hour) and the worst
moments with the trials running then. A corrupt or truncated line is skipped and
counted, never fatal: the last line of a log whose machine died is often half written.
"""

from __future__ import annotations

import itertools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from optguard.errors import UsageError
from optguard.monitor import Thresholds

__all__ = ["analyze_log", "write_monitor_plot"]

WORST = 3  # the worst moments reported
MIN_TREND_SPAN_S = 60.0  # a per-hour trend from a shorter window is noise, extrapolated


def _read(path: Path) -> tuple[list[dict[str, Any]], int, int]:
    """``(samples with a parsed "t" in epoch seconds, skipped lines, warning events)``."""
    if not path.is_file():
        raise UsageError(f"--analyze: no such file: {path}")
    samples, skipped, warnings = [], 0, 0
    try:
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    if item.get("event") == "warning":
                        warnings += 1
                        continue
                    item["t"] = datetime.fromisoformat(item["timestamp"]).timestamp()
                    float(item["ram"]["percent"]), float(item["swap"]["percent"])
                    float(item["ram"]["used_bytes"])
                except (ValueError, KeyError, TypeError, AttributeError):
                    skipped += 1  # corrupt or truncated (JSONDecodeError is a ValueError)
                    continue
                samples.append(item)
    except OSError as exc:
        raise UsageError(f"--analyze: cannot read {path}: {exc.strerror}") from None
    samples.sort(key=lambda s: s["t"])
    return samples, skipped, warnings


def _values(samples: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Series name -> ``(t, value)``: ram_percent, ram_used_mb, swap_percent, gpuN_percent."""
    series: dict[str, list[tuple[float, float]]] = {
        "ram_percent": [], "ram_used_mb": [], "swap_percent": []
    }  # fmt: skip
    for s in samples:
        t = s["t"]
        series["ram_percent"].append((t, float(s["ram"]["percent"])))
        series["ram_used_mb"].append((t, float(s["ram"]["used_bytes"]) / 1e6))
        series["swap_percent"].append((t, float(s["swap"]["percent"])))
        for gpu in s.get("gpus") or []:
            if isinstance(gpu, dict) and "index" in gpu and "percent" in gpu:
                name = f"gpu{gpu['index']}_percent"
                series.setdefault(name, []).append((t, float(gpu["percent"])))
    return series


def _time_above(points: list[tuple[float, float]], threshold: float) -> float:
    """Seconds at or above: each interval counts when the sample that starts it is above."""
    pairs = itertools.pairwise(points)
    return sum((t1 - t0 for (t0, v0), (t1, _v1) in pairs if v0 >= threshold), 0.0)


def _slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of value over time, per hour; None with fewer than 2 instants."""
    if len(points) < 2:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    den = sum((t - mean_t) ** 2 for t, _ in points)
    if den == 0:
        return None
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / den * 3600.0


def analyze_log(path: Path, thresholds: Thresholds | None = None) -> dict[str, Any]:
    """The summary of a monitor log as one JSON-ready document (keys listed in the README)."""
    thresholds = thresholds or Thresholds()
    samples, skipped, warnings = _read(Path(path))
    series = _values(samples)
    limits = {"ram_percent": thresholds.ram, "swap_percent": thresholds.swap}
    limits.update({k: thresholds.gpu for k in series if k.startswith("gpu")})
    worst = sorted(samples, key=lambda s: (-float(s["ram"]["used_bytes"]), s["t"]))[:WORST]
    span = samples[-1]["t"] - samples[0]["t"] if samples else 0.0
    slope = _slope_per_hour(series["ram_used_mb"]) if span >= MIN_TREND_SPAN_S else None
    note = None
    if slope is None and len(samples) >= 2 and span < MIN_TREND_SPAN_S:
        note = (
            f"window too short: {span:.3g}s of samples, a trend needs at least "
            f"{MIN_TREND_SPAN_S:g}s"
        )
    return {
        "file": str(path),
        "samples": len(samples),
        "skipped_lines": skipped,
        "warnings": warnings,
        "start": samples[0]["timestamp"] if samples else None,
        "end": samples[-1]["timestamp"] if samples else None,
        "duration_s": round(samples[-1]["t"] - samples[0]["t"], 3) if samples else 0.0,
        "thresholds": {"ram": thresholds.ram, "gpu": thresholds.gpu, "swap": thresholds.swap},
        "series": {
            name: {"peak": round(max(v for _, v in pts), 3),
                   "mean": round(sum(v for _, v in pts) / len(pts), 3)}
            for name, pts in series.items() if pts
        },
        "time_above_s": {
            name.removesuffix("_percent"): round(_time_above(series[name], limit), 3)
            for name, limit in limits.items()
        },
        "ram_trend_mb_per_hour": None if slope is None else round(slope, 3),
        "ram_trend_note": note,
        "worst": [
            {"timestamp": s["timestamp"], "ram_percent": float(s["ram"]["percent"]),
             "ram_used_mb": round(float(s["ram"]["used_bytes"]) / 1e6, 1),
             "workers": [_worker(w) for w in s.get("workers") or [] if isinstance(w, dict)]}
            for s in worst
        ],
        "points": [
            {"timestamp": s["timestamp"], "ram_percent": float(s["ram"]["percent"]),
             "swap_percent": float(s["swap"]["percent"]),
             "gpus": {str(g["index"]): float(g["percent"]) for g in s.get("gpus") or []
                      if isinstance(g, dict) and "index" in g and "percent" in g}}
            for s in samples
        ],
    }


def _worker(w: dict[str, Any]) -> dict[str, Any]:
    rss = w.get("rss_bytes")
    return {"pid": w.get("pid"), "study": w.get("study"), "trial": w.get("trial"),
            "rss_mb": None if rss is None else round(float(rss) / 1e6, 1)}  # fmt: skip


def write_monitor_plot(summary: dict[str, Any], path: Path) -> None:
    """RAM, swap and GPU percent over time with dashed threshold lines, as a PNG."""
    if path.suffix.lower() != ".png":
        raise UsageError(f"--plot: {path.name} must end in .png")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot FILE.png needs matplotlib: pip install 'optguard[plot]'") from None
    points = summary["points"]
    times = [datetime.fromisoformat(p["timestamp"]) for p in points]
    th = summary["thresholds"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(times, [p["ram_percent"] for p in points], label="RAM", color="tab:blue")
    ax.plot(times, [p["swap_percent"] for p in points], label="swap", color="tab:orange")
    gpu_ids = sorted({k for p in points for k in p["gpus"]}, key=int)
    for gpu in gpu_ids:
        ax.plot(times, [p["gpus"].get(gpu, float("nan")) for p in points], label=f"GPU {gpu}")
    limits = [("RAM", th["ram"], "tab:blue"), ("swap", th["swap"], "tab:orange")]
    if gpu_ids:
        limits.append(("GPU", th["gpu"], "tab:gray"))
    for name, limit, color in limits:
        ax.axhline(limit, color=color, linestyle="--", linewidth=0.8, label=f"{name} {limit:g}%")
    ax.set_ylim(0, 105)
    ax.set_ylabel("percent")
    ax.set_title(f"optguard monitor: {Path(summary['file']).name}")
    ax.legend(loc="upper left", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
