"""``optguard report --html FILE``: the report as one self-contained page, read top to bottom.

Built from ``build_report``'s dict alone. Everything is inline (HTML, CSS and SVG charts; no
script, font or image is fetched) and every string from the study (its name, parameters,
reasons, workers) is escaped. Hover text is SVG ``<title>``: it needs no script.
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path
from typing import Any

from optguard.errors import UsageError

__all__ = ["render_html", "write_html"]

# Outcome of a trial, as shown: guard reasons apart from the pruner's prunes and from failures.
OUTCOMES = {  # key -> (label, colour)
    "complete": ("complete", "#2a9d8f"),
    "timeout": ("ended by the guard: timeout", "#0077b6"),
    "memory": ("ended by the guard: memory", "#7b2cbf"),
    "system_memory": ("ended by the guard: system memory", "#c2185b"),
    "gpu_memory": ("ended by the guard: GPU memory", "#4361ee"),
    "memory_oom": ("ran out of memory (recorded by the guard)", "#9d4edd"),
    "gpu_memory_oom": ("ran out of GPU memory (recorded by the guard)", "#4cc9f0"),
    "cancelled": ("ended by the guard: cancelled", "#6c757d"),
    "interrupted": ("ended by the guard: interrupted", "#f77f00"),
    "worker_died": ("ended by the guard: worker died", "#3a0ca3"),
    "other_reason": ("ended by the guard: other reason", "#9e2a2b"),
    "pruner": ("pruned by the pruner", "#e9c46a"),
    "failed": ("failed (error in the objective)", "#5c4033"),
    "running": ("running or waiting", "#a8dadc"),
}
WORKER_COLOURS = ("#1d3557", "#2a9d8f", "#e76f51", "#6a4c93", "#8ac926", "#1982c4", "#ffb703",
                  "#6c757d")  # fmt: skip
LIMIT_COLOUR = "#d00000"

# What a guard reason means, as the end of a sentence "N trials ...".
REASON_WORDS = {
    "timeout": "ran past the time limit{timeout}, and the guard ended {them}",
    "memory": "went over the memory limit{memory}, and the guard ended {them}",
    "gpu_memory": "went over the GPU memory limit{vram}, and the guard ended {them}",
    "memory_oom": "ran out of memory (the objective's allocation failed), and the guard "
                  "recorded {them} as pruned",
    "gpu_memory_oom": "ran out of GPU memory (the objective's allocation failed), and the "
                      "guard recorded {them} as pruned",
    "system_memory": "{were} among the largest users of memory when the machine ran short of "
                     "RAM, and the guard ended {them} to free it",
    "cancelled": "{were} running when optguard cancel was asked for, and the guard ended {them}",
    "interrupted": "{were} interrupted (the worker or its host stopped), and marked for a retry",
    "worker_died": "lost {their} worker process mid-trial (it died)",
}  # fmt: skip


def guard_key(point: dict[str, Any]) -> str:
    """A guard reason, or ``memory_oom``/``gpu_memory_oom`` when the objective ran out of
    memory (no limit was crossed: "went over the limit" would be untrue)."""
    reason = str(point.get("reason"))
    return f"{reason}_oom" if point.get("enforcement") == "oom" else reason


def outcome(point: dict[str, Any]) -> str:
    """The key in ``OUTCOMES`` of one of the report's points."""
    state, reason = point["state"], point.get("reason")
    if state == "COMPLETE":
        return "complete"
    if reason:
        key = guard_key(point)
        return key if key in OUTCOMES else "other_reason"
    if state == "PRUNED":
        return "pruner"
    if state == "FAIL":
        return "failed"
    return "running"


def fmt_mb(mb: float) -> str:
    if abs(mb) >= 1000:
        return f"{mb / 1000:.3g} GB"
    return f"{mb:.3g} MB" if abs(mb) < 100 else f"{mb:.0f} MB"


def fmt_s(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.3g} h"
    if s >= 120:
        return f"{s / 60:.3g} min"
    return f"{s:.3g} s"


def _link(trial: Any) -> str:
    n = escape(str(trial))
    return f'<a href="#trial-{n}">#{n}</a>'


def _links(trials: list[Any], most: int = 40) -> str:
    shown = ", ".join(_link(t) for t in trials[:most])
    return shown + (f" and {len(trials) - most} more" if len(trials) > most else "")


def _nice_ticks(top: float, count: int = 5) -> list[float]:
    if top <= 0:
        return [0.0]
    raw = top / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(top / step + 1e-9) + 1)]


def svg_chart(
    title: str,
    y_label: str,
    fmt: Any,
    series: list[dict[str, Any]],
    limit: tuple[float, str] | None = None,
    x_label: str = "trial number",
    standalone: bool = False,
    x_limit: tuple[float, str] | None = None,
) -> str:
    """A scatter (or lines) chart of y against trial number (or, with another ``x_label``,
    seconds). ``series``: dicts with ``label``, ``colour``, ``points`` [(x, y, hover)], and
    ``line`` (join the points). ``standalone``: an SVG file of its own, with its styles.
    ``x_limit``: a limit on the x axis (a timeout), drawn upright; seconds start at 0."""
    whole_x = x_label == "trial number"
    width, height = 900, 340
    left, right, top_pad, bottom = 80, 280, 44, 56
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    pts = [(x, y) for s in series for x, y, _ in s["points"] if y is not None]
    xs = [x for x, _ in pts] or [0]
    ys = [y for _, y in pts] + ([limit[0]] if limit else [])
    x0, x1 = (min(xs) if whole_x else 0.0), max(xs + ([x_limit[0]] if x_limit else []))
    x1 = x1 if x1 > x0 else x0 + 1
    y_top = (max(ys) if ys else 1.0) * 1.1 or 1.0
    ticks = _nice_ticks(y_top)
    y_top = max(y_top, ticks[-1])

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top_pad + plot_h - y / y_top * plot_h

    out = [
        f'<svg class="chart" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        + ('xmlns="http://www.w3.org/2000/svg" ' if standalone else "")
        + f'aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        *([f"<style>{CHART_CSS}</style>"] if standalone else []),
        f'<text x="{left}" y="24" class="ctitle">{escape(title)}</text>',
        f'<rect x="{left}" y="{top_pad}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
        'stroke="#bbb"/>',
    ]
    for t in ticks:
        y = py(t)
        out.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" '
                   'stroke="#e4e4e4"/>')  # fmt: skip
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">'
                   f"{escape(fmt(t))}</text>")  # fmt: skip
    for t in _nice_ticks(x1 - x0, 8):
        if x0 + t > x1 + 1e-9 or (whole_x and t != int(t)):  # trial numbers are whole
            continue
        x = px(x0 + t)
        out.append(f'<line x1="{x:.1f}" y1="{top_pad + plot_h}" x2="{x:.1f}" '
                   f'y2="{top_pad + plot_h + 4}" stroke="#888"/>')  # fmt: skip
        out.append(f'<text x="{x:.1f}" y="{top_pad + plot_h + 17}" class="tick" '
                   f'text-anchor="middle">{x0 + t:g}</text>')  # fmt: skip
    out.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 12}" class="axis" '
               f'text-anchor="middle">{escape(x_label)}</text>')  # fmt: skip
    cy = top_pad + plot_h / 2
    out.append(f'<text x="16" y="{cy:.0f}" class="axis" text-anchor="middle" '
               f'transform="rotate(-90 16 {cy:.0f})">{escape(y_label)}</text>')  # fmt: skip
    if limit:
        y = py(limit[0])
        out.append(
            f'<line class="limit" x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" '
            f'y2="{y:.1f}" stroke="{LIMIT_COLOUR}" stroke-width="1.5" '
            f'stroke-dasharray="6 4"><title>{escape(limit[1])}</title></line>'
        )
        out.append(
            f'<text x="{left + plot_w - 4}" y="{y - 5:.1f}" class="limitlabel" '
            f'text-anchor="end" fill="{LIMIT_COLOUR}">{escape(limit[1])}</text>'
        )
    if x_limit:
        x = px(x_limit[0])
        out.append(
            f'<line class="limit" x1="{x:.1f}" y1="{top_pad}" x2="{x:.1f}" '
            f'y2="{top_pad + plot_h}" stroke="{LIMIT_COLOUR}" stroke-width="1.5" '
            f'stroke-dasharray="6 4"><title>{escape(x_limit[1])}</title></line>'
        )
        out.append(
            f'<text x="{x - 4:.1f}" y="{top_pad + 14}" class="limitlabel" '
            f'text-anchor="end" fill="{LIMIT_COLOUR}">{escape(x_limit[1])}</text>'
        )
    for s in series:
        shown = [(x, y, hover) for x, y, hover in s["points"] if y is not None]
        if s.get("line") and len(shown) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y, _ in shown)
            out.append(f'<polyline points="{path}" fill="none" stroke="{s["colour"]}" '
                       f'stroke-width="{3 if s.get("bold") else 1.5}"/>')  # fmt: skip
        if s.get("note") and shown:
            x, y, _ = shown[-1]
            out.append(
                f'<text x="{px(x) - 6:.1f}" y="{py(y) - 9:.1f}" class="limitlabel" '
                f'text-anchor="end" fill="{s["colour"]}">{escape(s["note"])}</text>'
            )
        for x, y, hover in shown:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" '
                       f'fill="{s["colour"]}" stroke="#fff" stroke-width="0.5">'
                       f"<title>{escape(hover)}</title></circle>")  # fmt: skip
    # legend: only what is drawn
    entries = [(s["label"], s["colour"], "dot") for s in series if any(
        y is not None for _, y, _ in s["points"])]  # fmt: skip
    entries += [(lim[1], LIMIT_COLOUR, "dash") for lim in (limit, x_limit) if lim]
    lx, ly = left + plot_w + 16, top_pad + 6
    out.append(f'<g class="legend"><text x="{lx}" y="{ly}" class="axis">legend</text>')
    for i, (label, colour, kind) in enumerate(entries):
        y = ly + 18 + i * 18
        if kind == "dot":
            out.append(f'<circle cx="{lx + 6}" cy="{y - 4}" r="4.5" fill="{colour}"/>')
        else:
            out.append(
                f'<line x1="{lx}" y1="{y - 4}" x2="{lx + 14}" y2="{y - 4}" '
                f'stroke="{colour}" stroke-width="1.5" stroke-dasharray="4 2"/>'
            )
        out.append(f'<text x="{lx + 20}" y="{y}" class="tick">{escape(label)}</text>')
    out.append("</g></svg>")
    return "\n".join(out)


def _hover(p: dict[str, Any]) -> str:
    parts = [f"trial #{p['trial']}: {OUTCOMES[outcome(p)][0]}"]
    if p.get("reason"):
        parts.append(f"reason: {p['reason']}")
    if p.get("duration_s") is not None:
        parts.append(f"duration {fmt_s(p['duration_s'])}")
    if p.get("peak_mb") is not None:
        parts.append(f"peak {fmt_mb(p['peak_mb'])}")
    if p.get("final_mb") is not None:
        parts.append(f"final {fmt_mb(p['final_mb'])}")
    return "; ".join(parts)


def _outcome_series(points: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    series = []
    for name, (label, colour) in OUTCOMES.items():
        chosen = [p for p in points if outcome(p) == name]
        if chosen:
            series.append(
                {
                    "label": label,
                    "colour": colour,
                    "points": [(p["trial"], p[key], _hover(p)) for p in chosen],
                }
            )
    return series


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are HTML already (escaped by the caller)."""
    th = "".join(f"<th>{h}</th>" for h in head)
    thead = f"<thead><tr>{th}</tr></thead>" if head else ""
    body = "\n".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}">{thead}<tbody>\n{body}\n</tbody></table>'


def _state_words(counts: dict[str, int]) -> str:
    """``13 complete, 2 pruned, 1 failed``: counts per state in words, in a fixed order."""
    order = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
    ranked = sorted(counts.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order
                                                    else len(order), kv[0]))  # fmt: skip
    words = {"FAIL": "failed"}
    return ", ".join(f"{n} {escape(words.get(s, s.lower()))}" for s, n in ranked if n)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _guard_sentences(report: dict[str, Any], mem_mb: float | None,
                     timeout: float | None) -> list[str]:  # fmt: skip
    points = report["points"]
    vram_mb = ((report.get("limits") or {}).get("max_vram_bytes") or 0) / 1e6 or None
    by_reason: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        if p.get("reason"):
            by_reason.setdefault(guard_key(p), []).append(p)
    out = []
    for reason, items in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        words = REASON_WORDS.get(reason, "{were} ended by optguard with reason “{reason}”")
        one = len(items) == 1
        words = words.format(
            reason=reason,
            were="was" if one else "were",
            them="it" if one else "them",
            their="its" if one else "their",
            timeout=f" of {fmt_s(timeout)}" if timeout else "",
            memory=f" of {fmt_mb(mem_mb)}" if mem_mb else "",
            vram=f" of {fmt_mb(vram_mb)}" if vram_mb else "",
        )
        states = sorted({"failed" if p["state"] == "FAIL" else p["state"].lower() for p in items})
        extra = ""
        if reason == "timeout":
            ds = [p["duration_s"] for p in items if p.get("duration_s") is not None]
            if ds:
                extra = (
                    f" It ran {fmt_s(ds[0])}."
                    if len(ds) == 1
                    else f" They ran {fmt_s(min(ds))} to {fmt_s(max(ds))}."
                )
        if reason in ("memory", "memory_oom"):
            peaks = [p["peak_mb"] for p in items if p.get("peak_mb") is not None]
            if peaks:
                extra = f" Peak memory reached up to {fmt_mb(max(peaks))}."
        if reason in ("gpu_memory", "gpu_memory_oom"):
            peaks = [p["peak_vram_mb"] for p in items if p.get("peak_vram_mb") is not None]
            if peaks:
                extra = f" Peak GPU memory reached up to {fmt_mb(max(peaks))}."
        out.append(
            f"<strong>{_plural(len(items), 'trial')}</strong> {escape(words, quote=False)} "
            f"(state {escape(', '.join(states))}): {_links([p['trial'] for p in items])}.{extra}"
        )
    if report.get("hard_kills"):
        n = report["hard_kills"]
        out.append(
            f"Of the trials the guard ended, {n} {'was' if n == 1 else 'were'} ended by "
            "the supervisor's hard kill (no check was reached and the interrupt did not "
            "stop the trial)."
        )
    pruner = [p["trial"] for p in points if outcome(p) == "pruner"]
    if pruner:
        out.append(
            f"<strong>{_plural(len(pruner), 'trial')}</strong> "
            f"{'was' if len(pruner) == 1 else 'were'} pruned by the "
            f"study's pruner, not by the guard: {_links(pruner)}."
        )
    failed = [p["trial"] for p in points if outcome(p) == "failed"]
    if failed:
        out.append(
            f"<strong>{_plural(len(failed), 'trial')}</strong> failed with an error in "
            f"the objective: {_links(failed)}."
        )
    if not by_reason:
        out.insert(0, "The guard ended no trial: no trial went over a limit.")
    return out


CHART_CSS = """
svg .ctitle { font-size: 15px; font-weight: bold; } svg .axis { font-size: 12px; }
svg .tick { font-size: 11px; } svg .limitlabel { font-size: 12px; font-weight: bold; }
svg { font-family: sans-serif; }
"""
CSS = """
body { font-family: sans-serif; margin: 24px auto; max-width: 960px; color: #222;
       line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { border: 1px solid #ccc;
  padding: 3px 8px; text-align: left; } th { background: #f0f0f0; }
td.num { text-align: right; }
.leak { color: #b00000; font-weight: bold; } .muted { color: #666; font-size: 0.9em; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 5px;
  margin-right: 5px; }
svg.chart { display: block; margin: 1em 0; font-family: sans-serif; }
:target { background: #fff3b0; font-weight: bold; }
""" + CHART_CSS


def render_html(report: dict[str, Any]) -> str:
    """The page, as one string."""
    e = escape
    study = str(report["study"])
    limits = report.get("limits") or {}
    mem_mb = (limits.get("max_rss_bytes") or 0) / 1e6 or None
    timeout = limits.get("timeout_s") or None
    points = report["points"]
    body: list[str] = [f"<h1>optguard report: {e(study)}</h1>"]

    # 1. The study
    if report.get("best"):
        best = f"{report['best']['value']:.6g} (trial {_link(report['best']['trial'])})"
    elif len(report.get("directions") or []) > 1:
        best = f"Pareto front of {len(report['best_trials'])} trial(s)"
    else:
        best = "none (no complete trial)"
    rows = [
        ["study", e(study)],
        ["storage", e(str(report["storage"]))],
        ["direction", e(", ".join(report.get("directions") or []))],
        ["trials", str(report["trials"])],
        ["best", best],
        ["time limit per trial", e(fmt_s(timeout)) if timeout else "not recorded"],
        ["memory limit per trial", e(fmt_mb(mem_mb)) if mem_mb else "not recorded"],
    ]
    body += ['<h2 id="study">The study</h2>', _table([], rows, "summary")]
    counts: dict[str, int] = {}
    for p in points:
        counts[outcome(p)] = counts.get(outcome(p), 0) + 1
    rows = [[f'<span class="swatch" style="background:{OUTCOMES[k][1]}"></span>'
             f"{e(OUTCOMES[k][0])}", f'<span class="num">{n}</span>']
            for k in OUTCOMES if (n := counts.get(k))]  # fmt: skip
    states = _state_words(report["states"])
    body += ["<h3>Outcomes</h3>", f"<p>By state: {states or 'no trials'}.</p>",
             _table(["outcome", "trials"], rows, "outcomes")]  # fmt: skip

    # 2. What the guard ended and why
    body.append('<h2 id="guard">What the guard ended, and why</h2>')
    body += [f"<p>{s}</p>" for s in _guard_sentences(report, mem_mb, timeout)]

    # 3. Parameter patterns
    body.append('<h2 id="patterns">Parameter patterns</h2>')
    if report["patterns"]:
        body.append("<ul>" + "".join(f"<li>{e(p['text'])}</li>" for p in report["patterns"])
                    + "</ul>")  # fmt: skip
    else:
        body.append("<p>No parameter value ends for a guard reason more often than the others.</p>")
    body.append(f'<p class="muted">Rule: {e(report["pattern_rule"])}.</p>')

    # 4. Retries
    retries = report["retries"]
    body.append('<h2 id="retries">Retries</h2>')
    if retries["count"]:
        outcomes = _state_words(retries["outcomes"])
        reason_of = {p["trial"]: p.get("reason") for p in points}
        rows = [[_link(r["trial"]), _link(r["retry_of"]),
                 e(str(reason_of.get(r["retry_of"]) or "-")), e(r["state"].lower())]
                for r in retries["trials"]]  # fmt: skip
        body += [f"<p>{_plural(retries['count'], 'retry')} ({outcomes}). Each retry runs the "
                 "parameters of the trial it retries.</p>",
                 _table(["retry", "retries trial", "original's reason", "retry's outcome"], rows,
                        "retries")]  # fmt: skip
    else:
        body.append("<p>No trial was retried.</p>")

    # 5. Memory per worker
    body.append('<h2 id="memory">Memory per worker across trials</h2>')
    trend = report["memory_trend"]
    if trend:
        rows = []
        for worker, t in trend.items():
            flag = (
                '<span class="leak">LEAK: cleanup is not reclaiming</span>' if t["leak"] else "no"
            )
            rows.append([e(worker), str(len(t["trials"])),
                         f"{e(fmt_mb(t['final_mb'][0]))} → {e(fmt_mb(t['final_mb'][-1]))}",
                         f"{t['growth_mb']:+.1f} MB", f"{t['growth_mb_per_trial']:+.2f} MB/trial",
                         flag])  # fmt: skip
        body.append(_table(["worker", "trials", "final memory, first → last", "growth",
                            "per trial", "leak"], rows, "memory"))  # fmt: skip
        leaks = [w for w, t in trend.items() if t["leak"]]
        if leaks:
            body.append(
                f'<p class="leak">Leaking: {e(", ".join(leaks))}: the memory left after '
                "each trial's cleanup keeps growing.</p>"
            )
        body.append(f'<p class="muted">Leak rule: {e(report["leak_rule"])}.</p>')
        series = []
        for i, (worker, t) in enumerate(trend.items()):
            label = f"{worker} (LEAK)" if t["leak"] else worker
            colour = LIMIT_COLOUR if t["leak"] else WORKER_COLOURS[i % len(WORKER_COLOURS)]
            series.append({
                "label": label, "colour": colour, "line": True, "bold": t["leak"],
                "note": f"LEAK {t['growth_mb']:+.0f} MB" if t["leak"] else None,
                "points": [(n, mb, f"trial #{n} on {worker}: final memory {fmt_mb(mb)}"
                            + (" (leaking worker)" if t["leak"] else ""))
                           for n, mb in zip(t["trials"], t["final_mb"], strict=True)],
            })  # fmt: skip
        body.append(svg_chart("Final memory after cleanup, per worker", "final memory (MB)",
                              fmt_mb, series[:12]))  # fmt: skip
        if len(series) > 12:
            body.append(
                f'<p class="muted">The chart shows the first 12 of {len(series)} '
                "workers; the table lists all.</p>"
            )
    else:
        body.append("<p>No trial recorded its worker's memory after cleanup.</p>")

    # 6. Charts per trial
    body.append('<h2 id="charts">Memory and duration per trial</h2>')
    body.append('<p class="muted">Hover over a point for its trial, outcome and reason.</p>')
    mem_limit = (mem_mb, f"memory limit {fmt_mb(mem_mb)}") if mem_mb else None
    time_limit = (timeout, f"time limit {fmt_s(timeout)}") if timeout else None
    charts = [
        ("Peak memory per trial", "peak memory (MB)", fmt_mb, "peak_mb", mem_limit, "peak memory"),
        ("Duration per trial", "duration (s)", fmt_s, "duration_s", time_limit, "duration"),
    ]
    for title, y_label, fmt, key, limit, what in charts:
        if any(p.get(key) is not None for p in points):
            body.append(svg_chart(title, y_label, fmt, _outcome_series(points, key), limit))
        else:
            body.append(f"<p>{title}: no trial recorded its {what}.</p>")

    # 7. Best trials
    if len(report.get("directions") or []) > 1 and report.get("best_trials"):
        body.append('<h2 id="best">Pareto front</h2>')
        rows = [[_link(b["trial"]), e(", ".join(f"{v:.6g}" for v in b["values"])),
                 e(", ".join(f"{k}={v}" for k, v in b["params"].items()))]
                for b in report["best_trials"][:50]]  # fmt: skip
        body.append(_table(["trial", "values", "parameters"], rows, "best"))

    # 8. Every trial (the anchors the links point to)
    body.append('<h2 id="trials">Every trial</h2>')
    rows = []
    for p in points:
        rows.append(
            [
                f'<span id="trial-{p["trial"]}">{p["trial"]}</span>',
                f'<span class="swatch" style="background:{OUTCOMES[outcome(p)][1]}"></span>'
                f"{e(OUTCOMES[outcome(p)][0])}",
                e(str(p.get("reason") or "-")),
                "-" if p.get("duration_s") is None else e(fmt_s(p["duration_s"])),
                "-" if p.get("peak_mb") is None else e(fmt_mb(p["peak_mb"])),
                "-" if p.get("final_mb") is None else e(fmt_mb(p["final_mb"])),
            ]
        )
    table = _table(["trial", "outcome", "reason", "duration", "peak memory", "final memory"],
                   rows, "trials")  # fmt: skip
    body.append(table)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>optguard report: {e(study)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def write_html(report: dict[str, Any], path: Path) -> None:
    """Write ``render_html(report)`` to ``path``; ``UsageError`` if it cannot be written."""
    directory = path.parent
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise UsageError(f"--html: cannot write {path}: directory {directory} {what}")
    try:
        path.write_text(render_html(report), encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--html: cannot write {path}: {exc.strerror or exc}") from None
