"""How ``optguard monitor`` shows itself: a live Rich table on a terminal, plain lines in a
file or pipe, and the ``--analyze`` summary. Rendering only; the numbers come from
``optguard.monitor`` and ``optguard.monitor_analysis``."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from optguard.limits import format_gb

__all__ = ["MonitorView", "render_analysis"]


def _workers_text(workers: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"pid {w['pid']} {'trial #' + str(w['trial']) if w['trial'] is not None else 'trial ?'} "
        f"{format_gb(w['rss_bytes'], 2)}"
        for w in workers
    )


def _line(data: dict[str, Any]) -> str:
    ram, swap = data["ram"], data["swap"]
    used, total = format_gb(ram["used_bytes"]), format_gb(ram["total_bytes"])
    parts = [
        data["timestamp"][:19],
        f"ram {ram['percent']:.1f}% ({used} of {total})",
        f"swap {swap['percent']:.1f}%",
    ]
    parts += [f"gpu{g['index']} {g['percent']:.1f}%" for g in data["gpus"]]
    if data["workers"]:
        parts.append(f"workers: {_workers_text(data['workers'])}")
    return "  ".join(parts)


class MonitorView:
    """Live table on a terminal (redrawn in place), one plain line per sample otherwise."""

    def __init__(self) -> None:
        self.console = Console(soft_wrap=True)
        self.live: Live | None = None
        if self.console.is_terminal:
            self.live = Live(console=self.console, auto_refresh=False, transient=False)
            self.live.start()

    def print(self, text: str) -> None:
        """A notice or warning: above the live table, or a line of its own."""
        self.console.print(text, markup=False, highlight=False)

    def __call__(self, data: dict[str, Any], warnings: list[dict[str, Any]]) -> None:
        for event in warnings:
            self.print(f"optguard: warning: {event['message']}")
        if self.live is None:
            self.print(_line(data))
            return
        memory = Table(title=f"{data['host']}  {data['timestamp'][:19]}", title_justify="left")
        for column in ("", "used", "total", "%"):
            memory.add_column(column, justify="left" if not column else "right")
        ram, swap = data["ram"], data["swap"]
        memory.add_row("RAM", format_gb(ram["used_bytes"]), format_gb(ram["total_bytes"]),
                       f"{ram['percent']:.1f}")  # fmt: skip
        memory.add_row("swap", format_gb(swap["used_bytes"]), "", f"{swap['percent']:.1f}")
        for g in data["gpus"]:
            memory.add_row(f"GPU {g['index']} {g['name']}", format_gb(g["used_bytes"]),
                           format_gb(g["total_bytes"]), f"{g['percent']:.1f}")  # fmt: skip
        parts: list[Any] = [memory]
        if data["workers"]:
            table = Table(title="optguard workers", title_justify="left")
            for column in ("pid", "study", "trial", "processes", "tree RSS"):
                table.add_column(column, justify="right" if column != "study" else "left")
            for w in data["workers"]:
                trial = "?" if w["trial"] is None else f"#{w['trial']}"
                table.add_row(str(w["pid"]), w["study"] or "?", trial, str(w["processes"]),
                              format_gb(w["rss_bytes"], 2))  # fmt: skip
            parts.append(table)
        self.live.update(Group(*parts), refresh=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def render_analysis(summary: dict[str, Any]) -> None:
    """The ``--analyze`` summary for people."""
    console = Console(soft_wrap=True)
    out = console.print
    hours = summary["duration_s"] / 3600.0
    head = (f"{summary['file']}: {summary['samples']} samples over {hours:.2f}h "
            f"({summary['start']} to {summary['end']}), {summary['warnings']} warning(s), "
            f"{summary['skipped_lines']} corrupt line(s) skipped")  # fmt: skip
    out(head, markup=False, highlight=False)
    if not summary["samples"]:
        return
    table = Table(title_justify="left")
    for column in ("series", "peak", "mean", "threshold", "time at or above"):
        table.add_column(column, justify="left" if column == "series" else "right")
    th = summary["thresholds"]
    for name, stats in summary["series"].items():
        key = name.removesuffix("_percent")
        limit = th["gpu"] if key.startswith("gpu") else th.get(key)
        above = summary["time_above_s"].get(key)
        table.add_row(name, f"{stats['peak']:.1f}", f"{stats['mean']:.1f}",
                      "" if limit is None or above is None else f"{limit:g}%",
                      "" if above is None else f"{above:.0f}s")  # fmt: skip
    out(table)
    trend = summary["ram_trend_mb_per_hour"]
    note = summary.get("ram_trend_note")
    shown = note if trend is None and note else "-"
    out("RAM trend: " + (shown if trend is None else f"{trend:+.1f} MB/hour (least squares)"))
    for moment in summary["worst"]:
        workers = ", ".join(
            f"pid {w['pid']} trial {'?' if w['trial'] is None else '#' + str(w['trial'])} "
            f"{w['rss_mb']} MB" for w in moment["workers"]
        )  # fmt: skip
        out(f"worst: {moment['timestamp']} RAM {moment['ram_percent']:.1f}% "
            f"{moment['ram_used_mb']:.0f} MB" + (f": {workers}" if workers else ""),
            markup=False, highlight=False)  # fmt: skip
