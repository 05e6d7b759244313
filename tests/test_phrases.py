"""What people read and grep: the guard's phrases, `--help`, `report` and `monitor --analyze`
text (issue 13: values that print equal to their limit, defaults help swallowed, dicts)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest
from conftest import run_cli, sqlite_url
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from optguard.guard import Violation
from optguard.limits import format_against

MB, GB = 10**6, 10**9

# (value, limit, kind) -> (value as printed, limit as printed)
TABLE = [
    # small and large time limits: 2 s, 90 s, 30 min, 3 h
    (3.1, 2.0, "duration", "3.1s", "2s"),  # was "0.1min (limit 0.0min)"
    (2.0003, 2.0, "duration", "2.0003s", "2s"),
    (2.04, 2.0, "duration", "2.04s", "2s"),
    (91.3, 90.0, "duration", "91.3s", "90s"),
    (90.04, 90.0, "duration", "90.04s", "90s"),
    (0.0523, 0.05, "duration", "0.052s", "0.05s"),
    (1872.0, 1800.0, "duration", "31.2min", "30min"),
    (1801.0, 1800.0, "duration", "30.02min", "30min"),
    (11000.0, 3 * 3600.0, "duration", "3.1h", "3h"),
    (3 * 3600.0 + 5, 3 * 3600.0, "duration", "3.001h", "3h"),
    # small and large memory limits: 200 MB, 400 MB, 12 GB
    (201 * MB, 200 * MB, "size", "201MB", "200MB"),
    (200.3 * MB, 200 * MB, "size", "200.3MB", "200MB"),
    (416 * MB, 400 * MB, "size", "416MB", "400MB"),  # was "0.4GB (limit 0.4GB)"
    (400.4 * MB, 400 * MB, "size", "400.4MB", "400MB"),
    (260 * MB, 250 * MB, "size", "260MB", "250MB"),  # was "0.3GB (limit 0.2GB)"
    (12.1 * GB, 12 * GB, "size", "12.1GB", "12GB"),
    (12.0004 * GB, 12 * GB, "size", "12.0004GB", "12GB"),
    (12.9 * GB, 12 * 2**30, "size", "12.90GB", "12.88GB"),  # 12GiB
    (1.5 * GB, 1.5 * GB, "size", "1.5GB", "1.5GB"),  # equal values print equal
    (3600.0001, 3600.0, "duration", "1.000001h", "1h"),  # past six decimals: one step over
    (12 * GB + 1, 12 * GB, "size", "12.000001GB", "12GB"),
    (12 * GB - 1, 12 * GB, "size", "11.999999GB", "12GB"),
    (20 * MB, 14.4 * GB, "size", "0.02GB", "14.4GB"),  # never a nonzero value as 0.0
]


@pytest.mark.parametrize(("value", "limit", "kind", "shown", "shown_limit"), TABLE)
def test_format_against_table(
    value: float, limit: float, kind: str, shown: str, shown_limit: str
) -> None:
    assert format_against(value, limit, kind) == (shown, shown_limit)


def _number(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(s|min|h|B|KB|MB|GB|TB)", text)
    assert match, text
    return float(match.group(1))


@pytest.mark.parametrize("limit", [0.05, 0.5, 1, 2, 59, 90, 119, 120, 1800, 3599, 3600, 10800])
def test_durations_over_their_limit_never_print_equal(limit: float) -> None:
    for excess in (1e-4, 1e-3, 0.01, 0.04, 0.3, 1.0, 7.0, 61.0):
        shown, shown_limit = format_against(limit + excess, limit, "duration")
        assert shown[-1] == shown_limit[-1] and shown != shown_limit
        assert _number(shown) > _number(shown_limit) > 0, (limit, excess)
        assert not shown_limit.startswith("0.0") or limit < 0.1


@pytest.mark.parametrize("limit", [1 * MB, 200 * MB, 250 * MB, 400 * MB, 999 * MB, 1 * GB,
                                   12 * GB, 12 * 2**30, 2 * 10**12])  # fmt: skip
def test_sizes_over_their_limit_never_print_equal(limit: float) -> None:
    for excess in (1e-4, 1e-3, 0.01, 0.04, 0.3):
        value = limit * (1 + excess)
        shown, shown_limit = format_against(value, limit, "size")
        assert _number(shown) > _number(shown_limit) > 0, (limit, excess, shown, shown_limit)


def test_phrases_keep_their_grep_prefixes() -> None:
    timeout = Violation(3, "timeout", 3.1, 0, 2.0)
    assert timeout.phrase == "Trial timeout: 3.1s"
    assert timeout.log_line() == "Trial #3 pruned: Trial timeout: 3.1s (limit 2s)"
    memory = Violation(4, "memory", 1.0, 416 * MB, 400 * MB)
    assert memory.log_line() == "Trial #4 pruned: Memory limit exceeded: 416MB (limit 400MB)"
    long = Violation(5, "timeout", 1872.0, 0, 1800.0)
    assert long.log_line() == "Trial #5 pruned: Trial timeout: 31.2min (limit 30min)"
    system = Violation(6, "system_memory", 1.0, 3.2 * GB, 14.4 * GB)
    assert system.log_line() == (
        "Trial #6 pruned: Memory limit exceeded: 3.2GB (system RAM 14.4GB)"
    )
    assert Violation(7, "cancelled", 1.0, 0, 0.0).phrase == "Trial stopped: cancelled"


# --- --help ------------------------------------------------------------------------------------

RUN_DEFAULTS = ["[1]", "[30m]", "[12GB]", "[an existing study's own; minimize]", "[tpe]",
                "[median]", "[logs]", "[60s]", "[0s]", "[5s]", "[1.25]", "[90]", "[0]", "[off]",
                "[30s]", "[checkpoints]", "[10s]", "[10m]", "[3]",
                "[cores available / --workers]", "[keep]"]  # fmt: skip
WORKER_DEFAULTS = ["[30m]", "[12GB]", "[tpe]", "[median]", "[logs]", "[checkpoints]", "[10s]",
                   "[60s]", "[keep]"]  # fmt: skip


def _help(tmp_path: Path, *command: str, rich: bool = True) -> str:
    env = {"COLUMNS": "200"} if rich else {"COLUMNS": "200", "TYPER_USE_RICH": "0"}
    result = run_cli(*command, "--help", cwd=tmp_path, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _flat(text: str) -> str:
    """Help text with Rich's box borders gone and wrapped lines joined."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def _option_line(text: str, option: str) -> str:
    lines = [x for x in text.splitlines() if re.search(rf"(^|[\s│]){option}(\s|$)", x)]
    assert lines, f"{option} not in help"
    return lines[0]


@pytest.mark.parametrize(("command", "defaults"), [("run", RUN_DEFAULTS),
                                                   ("worker", WORKER_DEFAULTS)])  # fmt: skip
@pytest.mark.parametrize("rich", [True, False])
def test_help_shows_every_default_and_no_bool_metavar(
    tmp_path: Path, command: str, defaults: list[str], rich: bool
) -> None:
    text = _help(tmp_path, command, rich=rich)
    flat = _flat(text)
    for default in defaults:
        assert default in flat, default
    assert "\\[" not in text  # the escape never shows
    assert "<bool>" not in text
    for flag in ("--help", "--keep-pools"):
        assert "<bool>" not in _option_line(text, flag)
    assert "<str>" in _option_line(text, "--sampler")  # options with a value keep theirs


def test_root_help_debug_is_a_flag(tmp_path: Path) -> None:
    text = _help(tmp_path)
    for flag in ("--debug", "--help"):
        line = _option_line(text, flag)
        assert "<bool>" not in line and "Show" in line


# --- report text -------------------------------------------------------------------------------

DIST = {"x": CategoricalDistribution([1, 2])}


def _add(study: optuna.Study, state: TrialState, **attrs: object) -> None:
    study.add_trial(create_trial(
        state=state, value=1.0 if state == TrialState.COMPLETE else None, params={"x": 1},
        distributions=DIST, user_attrs={f"optguard.{k}": v for k, v in attrs.items()},
    ))  # fmt: skip


def test_report_text_in_words(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="words", storage=sqlite_url(tmp_path))
    study.set_user_attr("optguard.limits", {"timeout_s": 1800.0, "max_rss_bytes": 1e9})
    for _ in range(13):  # instant trials: 0% of the time limit
        _add(study, TrialState.COMPLETE, peak_rss_bytes=1e5)
    _add(study, TrialState.PRUNED, reason="timeout", peak_rss_bytes=1e5)
    _add(study, TrialState.PRUNED, reason="memory", peak_rss_bytes=9e8)
    _add(study, TrialState.COMPLETE, tag="fix-1", peak_rss_bytes=1e5)
    _add(study, TrialState.FAIL, tag="fix-1", reason="interrupted")
    for number in (13, 14, 14):
        study.enqueue_trial({"x": 1}, user_attrs={"optguard.retry_of": number})
    result = run_cli("report", "--study", "words", cwd=tmp_path, timeout=60,
                     env={"COLUMNS": "200"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "{'" not in out and "': " not in out, out  # no Python dict
    tags = "Per tag: (none): 13 complete, 2 pruned, 3 waiting; fix-1: 1 complete, 1 failed"
    assert tags in out, out
    assert "Retries: 3 (3 waiting)" in out, out
    assert "Closest to the timeout limit: none, no trial used 1% of it" in out, out
    assert " 0%" not in out, out
    assert "Closest to the memory limit: #14 90%" in out, out


# --- monitor --analyze --------------------------------------------------------------------------


def _sample(second: int, used_mb: float) -> str:
    return json.dumps({
        "timestamp": f"2025-01-01T00:00:{second:02d}+00:00", "host": "h",
        "ram": {"total_bytes": 10**10, "used_bytes": int(used_mb * 1e6), "percent": 50.0},
        "swap": {"used_bytes": 0, "percent": 0.0}, "gpus": [], "workers": [],
    })  # fmt: skip


def test_monitor_trend_needs_a_long_enough_window(tmp_path: Path) -> None:
    log = tmp_path / "short.jsonl"
    log.write_text("\n".join([_sample(0, 2000.0), _sample(1, 1990.0), _sample(2, 1990.17)]))
    data = json.loads(run_cli("monitor", "--analyze", str(log), "--json", cwd=tmp_path).stdout)
    assert data["duration_s"] == 2.0
    assert data["ram_trend_mb_per_hour"] is None
    assert data["ram_trend_note"].startswith("window too short: 2s of samples")
    text = run_cli("monitor", "--analyze", str(log), cwd=tmp_path, env={"COLUMNS": "200"})
    assert text.returncode == 0, text.stderr
    assert "RAM trend: window too short: 2s of samples, a trend needs at least 60s" in text.stdout
    assert "MB/hour" not in text.stdout

    long = tmp_path / "long.jsonl"  # a minute of samples is enough
    long.write_text("\n".join([_sample(0, 2000.0), _sample(30, 2001.0), _sample(59, 2000.0),
                               _sample(59, 2002.0).replace("00:00:59", "00:01:00")]))  # fmt: skip
    data = json.loads(run_cli("monitor", "--analyze", str(long), "--json", cwd=tmp_path).stdout)
    assert data["duration_s"] == 60.0
    assert data["ram_trend_mb_per_hour"] is not None and data["ram_trend_note"] is None
