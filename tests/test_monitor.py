"""`optguard monitor`: real sampling processes, real workers, and the analysis of a crafted log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import load_trials, log_text, objective, run_cli, sqlite_url
from optguard.monitor import Thresholds, ThresholdWatch

SAMPLE_KEYS = {"timestamp", "host", "ram", "swap", "gpus", "workers"}


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _monitor(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "optguard", "monitor", *args],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# --- sampling -------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_monitor_writes_jsonl_and_stops_cleanly(tmp_path: Path, signum: int) -> None:
    log = tmp_path / "m.jsonl"
    proc = _monitor(tmp_path, "--interval", "0.2s", "--log", str(log),
                    "--warn-ram", "100", "--warn-swap", "100", "--warn-gpu", "100")  # fmt: skip
    try:
        _wait_for(lambda: log.exists() and log.read_text().count("\n") >= 3, "3 samples")
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    text = log.read_text()
    assert text.endswith("\n")  # the last line is complete
    samples = [line for line in _lines(log) if "event" not in line]
    assert len(samples) >= 3
    assert f"optguard: {len(samples)} samples written to {log}" in out.splitlines()[-1]
    for s in samples:
        assert set(s) == SAMPLE_KEYS
        assert s["ram"]["total_bytes"] > s["ram"]["used_bytes"] > 0
        assert 0 < s["ram"]["percent"] < 100
        assert set(s["swap"]) == {"used_bytes", "percent"}
        assert isinstance(s["gpus"], list) and isinstance(s["workers"], list)
    assert "Traceback" not in err


def test_sampling_without_a_study_imports_no_optuna() -> None:
    code = (
        "import sys; from optguard.monitor import sample, WorkerWatch;"
        "s = sample(None, WorkerWatch()); assert s['ram']['percent'] > 0;"
        "print(sorted(m for m in ('optuna', 'sqlalchemy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- thresholds -----------------------------------------------------------------------------


def _sample(ram: float, swap: float = 0.0, gpu: float | None = None) -> dict[str, Any]:
    gpus = [] if gpu is None else [{"index": 0, "percent": gpu}]
    return {"timestamp": "2025-01-01T00:00:00+00:00", "ram": {"percent": ram},
            "swap": {"percent": swap}, "gpus": gpus, "workers": []}  # fmt: skip


def test_thresholds_warn_once_per_crossing() -> None:
    watch = ThresholdWatch(Thresholds(ram=85, gpu=90, swap=50))
    ram = [90, 95, 99, 80, 84.9, 86, 90]  # above, (still), (still), below, below, above, (still)
    events = [e for value in ram for e in watch.check(_sample(value))]
    assert [(e["series"], e["percent"]) for e in events] == [("ram", 90.0), ("ram", 86.0)]
    assert events[0]["event"] == "warning" and events[0]["threshold"] == 85
    assert "RAM at 90.0% (threshold 85%)" in events[0]["message"]

    watch = ThresholdWatch(Thresholds(ram=85, gpu=90, swap=50))
    seq = [(10, 60, 95), (10, 70, 50), (10, 40, 91), (10, 55, 92)]
    events = [e for r, s, g in seq for e in watch.check(_sample(r, s, g))]
    assert [e["series"] for e in events] == ["swap", "gpu0", "gpu0", "swap"]


def test_monitor_always_crossed_threshold_warns_once(tmp_path: Path) -> None:
    log = tmp_path / "m.jsonl"
    result = run_cli("monitor", "--interval", "0.1s", "--samples", "4", "--log", str(log),
                     "--warn-ram", "1", cwd=tmp_path, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = _lines(log)
    warnings = [line for line in lines if line.get("event") == "warning"]
    assert len(lines) - len(warnings) == 4
    assert len(warnings) == 1 and warnings[0]["series"] == "ram"
    assert warnings[0]["threshold"] == 1.0 and warnings[0]["percent"] >= 1.0
    assert result.stdout.count("optguard: warning: RAM at") == 1
    assert "4 samples written to" in result.stdout and "1 warning(s)" in result.stdout


@pytest.mark.parametrize(
    "args, text",
    [
        (["--log", "x.jsonl", "--no-log"], "--log and --no-log cannot be used together"),
        (["--interval", "soon"], "--interval: cannot parse 'soon'"),
        (["--warn-ram", "120"], "--warn-ram: must be a percentage in (0, 100]"),
        (["--json"], "--json and --plot go with --analyze FILE"),
        (["--analyze", "missing.jsonl"], "--analyze: no such file: missing.jsonl"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path: Path, args: list[str], text: str) -> None:
    result = run_cli("monitor", *args, cwd=tmp_path, timeout=30)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"optguard: error: {text}")
    assert not (tmp_path / "logs").exists()


# --- workers of this host -------------------------------------------------------------------


@pytest.mark.scenario
def test_monitor_finds_a_worker_and_its_trial(tmp_path: Path, study_name: str) -> None:
    run = subprocess.Popen(
        [sys.executable, "-m", "optguard", "run", "--study", study_name, "--workers", "1",
         "--objective", objective("sleepy.py:objective"), "--n-trials", "1", "--pruner", "none"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: (tmp_path / "logs").exists() and " started\n" in log_text(tmp_path),
                  "the trial to start", timeout=60)  # fmt: skip
        (trial,) = load_trials(sqlite_url(tmp_path), study_name)
        host, pid = trial.user_attrs["optguard.worker"].rsplit(":", 1)
        log = tmp_path / "with_study.jsonl"
        result = run_cli("monitor", "--interval", "0.2s", "--samples", "2", "--log", str(log),
                         "--study", study_name, cwd=tmp_path, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
        samples = [s for s in _lines(log) if "event" not in s]
        assert len(samples) == 2 and samples[0]["host"] == host
        (mine,) = [w for w in samples[-1]["workers"] if w["pid"] == int(pid)]
        assert mine["rss_bytes"] > 10**6 and mine["processes"] >= 1
        assert mine["trial"] == trial.number == 0 and mine["study"] == study_name
        assert f"study '{study_name}' on sqlite:///" in result.stdout
        assert "trial #0" in result.stdout

        plain = tmp_path / "without_study.jsonl"
        result = run_cli("monitor", "--samples", "1", "--log", str(plain), cwd=tmp_path, timeout=30)
        assert result.returncode == 0, result.stderr
        (mine,) = [w for w in _lines(plain)[0]["workers"] if w["pid"] == int(pid)]
        assert mine["trial"] is None and mine["rss_bytes"] > 10**6
    finally:
        run.send_signal(signal.SIGINT)  # first press stops, the second cancels the endless trial
        time.sleep(0.5)
        run.send_signal(signal.SIGINT)
        try:
            run.communicate(timeout=30)
        finally:
            if run.poll() is None:
                run.kill()
    assert run.returncode == 130
    assert not psutil.pid_exists(int(pid))


# --- analysis -------------------------------------------------------------------------------


def _crafted(path: Path) -> None:
    """Four samples a minute apart, a warning event, a corrupt line and a truncated last line."""

    def line(minute: int, ram: float, used_mb: float, swap: float, gpu: float,
             workers: list[dict[str, Any]] | None = None) -> str:  # fmt: skip
        return json.dumps({
            "timestamp": f"2025-01-01T00:0{minute}:00+00:00", "host": "h",
            "ram": {"total_bytes": 10**10, "used_bytes": int(used_mb * 1e6), "percent": ram},
            "swap": {"used_bytes": 0, "percent": swap},
            "gpus": [{"index": 0, "name": "g", "used_bytes": 1, "total_bytes": 2, "percent": gpu}],
            "workers": workers or [],
        })  # fmt: skip

    worker = {"pid": 11, "study": "s", "rss_bytes": 5 * 10**8, "processes": 2, "trial": 4}
    path.write_text("\n".join([
        line(0, 50.0, 1000, 0.0, 10.0),
        line(1, 90.0, 2000, 60.0, 95.0),
        json.dumps({"event": "warning", "timestamp": "2025-01-01T00:01:00+00:00",
                    "series": "ram", "percent": 90.0, "threshold": 85.0, "message": "RAM"}),
        "{this is not json",
        line(2, 70.0, 1500, 10.0, 92.0),
        line(3, 88.0, 3000, 55.0, 50.0, [worker]),
        '{"timestamp": "2025-01-01T00:04:00+00:00", "ram": {"tot',
    ]))  # fmt: skip


def test_analyze_crafted_log(tmp_path: Path) -> None:
    log, png = tmp_path / "m.jsonl", tmp_path / "m.png"
    _crafted(log)
    result = run_cli("monitor", "--analyze", str(log), "--json", "--plot", str(png),
                     cwd=tmp_path, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["samples"], data["skipped_lines"], data["warnings"]) == (4, 2, 1)
    assert data["duration_s"] == 180.0
    assert data["series"] == {
        "ram_percent": {"peak": 90.0, "mean": 74.5},  # (50 + 90 + 70 + 88) / 4
        "ram_used_mb": {"peak": 3000.0, "mean": 1875.0},
        "swap_percent": {"peak": 60.0, "mean": 31.25},
        "gpu0_percent": {"peak": 95.0, "mean": 61.75},
    }
    # An interval counts when the sample starting it is at or above: RAM and swap only the
    # minute after 00:01 (00:03 is last), the GPU the two minutes from 00:01 to 00:03.
    assert data["time_above_s"] == {"ram": 60.0, "swap": 60.0, "gpu0": 120.0}
    # t = 0, 60, 120, 180 s; used = 1000, 2000, 1500, 3000 MB: slope 165000 / 18000 MB/s.
    assert data["ram_trend_mb_per_hour"] == pytest.approx(165000 / 18000 * 3600)
    assert [w["ram_used_mb"] for w in data["worst"]] == [3000.0, 2000.0, 1500.0]
    assert data["worst"][0]["workers"] == [{"pid": 11, "study": "s", "trial": 4, "rss_mb": 500.0}]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    text = run_cli("monitor", "--analyze", str(log), "--warn-ram", "95", cwd=tmp_path, timeout=30)
    assert text.returncode == 0, text.stderr
    assert "4 samples over 0.05h" in text.stdout and "2 corrupt line(s) skipped" in text.stdout
    assert "+33000.0 MB/hour" in text.stdout and "pid 11 trial #4 500.0 MB" in text.stdout


def test_analyze_library_with_other_thresholds(tmp_path: Path) -> None:
    from optguard.monitor_analysis import analyze_log

    log = tmp_path / "m.jsonl"
    _crafted(log)
    data = analyze_log(log, Thresholds(ram=60, gpu=99, swap=5))
    assert data["time_above_s"] == {"ram": 120.0, "swap": 120.0, "gpu0": 0.0}
    assert os.path.basename(data["file"]) == "m.jsonl"
