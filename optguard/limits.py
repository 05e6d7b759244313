"""Trial limits and the units users write them in (``90s``, ``1.5h``, ``512MB``, ``12GiB``).

Sizes follow SI/IEC: ``GB`` is 10**9 bytes and ``GiB`` is 2**30 bytes. Memory shown in log
lines uses the same decimal units, so a limit written as ``12GB`` is printed as ``12GB``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from optguard.errors import UsageError

__all__ = [
    "Limits",
    "Escalation",
    "parse_duration",
    "parse_size",
    "parse_percent",
    "parse_ratio",
    "format_gb",
    "format_minutes",
    "format_against",
]

_DURATION_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gib": 2**30,
    "tib": 2**40,
}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")

DEFAULT_TIMEOUT_S = 30 * 60.0
DEFAULT_MAX_RSS = 12 * 10**9


def _split(text: str | int | float, option: str) -> tuple[float, str]:
    if isinstance(text, bool):
        raise UsageError(f"{option}: expected a number with a unit, got {text!r}")
    if isinstance(text, (int, float)):
        return float(text), ""
    match = _NUMBER_UNIT.match(str(text))
    if match is None:
        raise UsageError(f"{option}: cannot parse {text!r}")
    return float(match.group(1)), match.group(2).lower()


def parse_duration(
    text: str | int | float, option: str = "duration", allow_zero: bool = False
) -> float:
    """Seconds from ``90s``, ``30m``, ``1.5h``, ``2d`` or bare seconds; must be positive
    (or zero, for a wait that may be skipped)."""
    number, unit = _split(text, option)
    if unit not in _DURATION_UNITS:
        raise UsageError(f"{option}: unknown duration unit {unit!r} in {text!r} (use s, m, h, d)")
    seconds = number * _DURATION_UNITS[unit]
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        raise UsageError(
            f"{option}: must be {'zero or ' if allow_zero else ''}positive, got {text!r}"
        )
    return seconds


def parse_size(text: str | int | float, option: str = "size") -> int:
    """Bytes from ``512MB``, ``12GB``, ``12GiB`` or bare bytes; must be positive."""
    number, unit = _split(text, option)
    if unit not in _SIZE_UNITS:
        raise UsageError(f"{option}: unknown size unit {unit!r} in {text!r} (use MB, GB, MiB, GiB)")
    size = int(number * _SIZE_UNITS[unit])
    if size <= 0:
        raise UsageError(f"{option}: must be positive, got {text!r}")
    return size


def parse_percent(text: str | int | float, option: str = "percent") -> float:
    """A percentage in (0, 100], with or without ``%``."""
    raw = text.strip().removesuffix("%") if isinstance(text, str) else text
    number, unit = _split(raw, option)
    if unit or not 0 < number <= 100:
        raise UsageError(f"{option}: must be a percentage in (0, 100], got {text!r}")
    return number


def parse_ratio(text: str | int | float, option: str = "ratio", minimum: float = 1.0) -> float:
    """A plain number, at least ``minimum`` (``1.25`` for a ceiling 25% above the limit)."""
    number, unit = _split(text, option)
    if unit or not math.isfinite(number) or number < minimum:
        raise UsageError(f"{option}: must be a number >= {minimum:g}, got {text!r}")
    return number


def format_gb(nbytes: float, digits: int = 1) -> str:
    """``12.1GB`` (decimal GB), the form users grep for."""
    return f"{nbytes / 1e9:.{digits}f}GB"


def format_minutes(seconds: float) -> str:
    """``31.2min``, the form users grep for."""
    return f"{seconds / 60.0:.1f}min"


# (unit, its size); the unit of a pair is the largest whose size the limit reaches
DURATION_UNITS = (("s", 1.0), ("min", 60.0), ("h", 3600.0))
DURATION_UNIT_FROM = {"s": 0.0, "min": 120.0, "h": 3600.0}  # 90s stays 90s, not 1.5min
SIZE_UNITS = (("B", 1.0), ("KB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12))
MAX_DECIMALS = 6


def _unit(limit: float, kind: str) -> tuple[str, float]:
    if kind == "duration":
        choices = [(n, f) for n, f in DURATION_UNITS if limit >= DURATION_UNIT_FROM[n]]
    elif kind == "size":
        choices = [(n, f) for n, f in SIZE_UNITS if limit >= f]
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return (choices or [SIZE_UNITS[0] if kind == "size" else DURATION_UNITS[0]])[-1]


def _fixed(number: float, decimals: int) -> str:
    return f"{number:.{decimals}f}"


def _strip(text: str) -> str:
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_against(value: float, limit: float, kind: str) -> tuple[str, str]:
    """``(value, limit)`` as two strings in one unit, e.g. ``("416MB", "400MB")``.

    ``kind`` is ``"duration"`` (seconds in; ``s``, ``min`` or ``h`` out) or ``"size"`` (bytes
    in; decimal ``B`` to ``TB`` out). The unit is the limit's, so the limit never prints as
    zero (``2s``, not ``0.0min``); the limit is shown without trailing zeros, exact up to four
    significant digits; the value gets one decimal below 100 units and none above, and more,
    up to six, until it prints differently from the limit (``400.4MB`` against ``400MB``)
    and, when it is not zero, differently from zero. A value closer to the limit than six
    decimals can show is printed one last-decimal step past it (``3.000001h`` for 3 h and
    a millisecond), so a value over its limit never reads as equal to it.
    """
    if not (math.isfinite(limit) and limit > 0):
        name, factor = _unit(abs(value) if math.isfinite(value) else 0.0, kind)
        return _strip(_fixed(value / factor, 1)) + name, "-"
    name, factor = _unit(limit, kind)
    v, lim = value / factor, limit / factor
    cap = min(MAX_DECIMALS, max(0, 3 - math.floor(math.log10(lim))))
    limit_decimals = next(
        (d for d in range(cap + 1) if abs(round(lim, d) - lim) <= 1e-9 * lim), cap
    )
    decimals = max(1 if lim < 100 else 0, limit_decimals)
    while decimals < MAX_DECIMALS and (
        (v != lim and _fixed(v, decimals) == _fixed(lim, decimals))
        or (v != 0 and float(_fixed(v, decimals)) == 0)
    ):
        decimals += 1
    if v != lim and _fixed(v, decimals) == _fixed(lim, decimals):
        # closer than the last decimal shown: one step off the limit, on the value's side
        v = round(lim, decimals) + math.copysign(10.0**-decimals, v - lim)
    return _fixed(v, decimals) + name, _strip(_fixed(lim, limit_decimals)) + name


@dataclass(frozen=True)
class Limits:
    """What one trial may use. ``None`` disables a limit."""

    timeout_s: float | None = DEFAULT_TIMEOUT_S
    max_rss_bytes: int | None = DEFAULT_MAX_RSS
    # --max-vram: GPU memory of the trial, in bytes or (until the GPUs are known) a percent
    # of the total memory of the worker's GPUs (optguard.gpus).
    max_vram_bytes: int | None = None
    max_vram_percent: float | None = None

    @property
    def vram_limited(self) -> bool:
        return self.max_vram_bytes is not None or self.max_vram_percent is not None


@dataclass(frozen=True)
class Escalation:
    """How the supervisor enforces the limits of a trial that never reaches a check.

    After the soft limit: ``grace_s`` (time) or ``memory_grace_s`` (memory; by default none,
    since a leak keeps growing and the machine's memory is at stake) until the worker is
    interrupted, then ``kill_after_s`` (0.5 s when the worker does not acknowledge the interrupt:
    stuck in C) until SIGTERM to its process tree, and ``kill_after_s`` more until SIGKILL.
    Memory above ``memory_ceiling`` times the limit is killed at once.
    ``max_system_ram_pct`` prunes the biggest running trial when the machine runs short.
    """

    grace_s: float = 60.0
    memory_grace_s: float = 0.0
    kill_after_s: float = 5.0
    memory_ceiling: float = 1.25
    max_system_ram_pct: float = 90.0
