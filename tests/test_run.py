"""``optguard run`` end to end: real worker processes, real SQLite/PostgreSQL/MySQL, real logs."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest
from optuna.trial import TrialState

from conftest import MYSQL_URL, PG_URL, load_trials, log_text, objective, run_cli, sqlite_url

LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR|DEBUG) "
    r"worker=\d+:\d+ trial=(-|\d+(,\d+)*) \S"
)


def _run(cwd: Path, study: str, target: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "run", "--study", study, "--objective", objective(target), "--pruner", "none", *extra,
        cwd=cwd,
    )  # fmt: skip


def test_timeout_prunes_with_reason_and_log_line(tmp_path: Path, study_name: str) -> None:
    result = _run(tmp_path, study_name, "sleepy.py:objective", "--n-trials", "2", "--timeout", "1")
    assert result.returncode == 0, result.stderr
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    for t in trials:
        attrs = t.user_attrs
        assert attrs["optguard.reason"] == "timeout"
        assert attrs["optguard.limit"] == attrs["optguard.limit_s"] == 1.0
        assert "optguard.limit_bytes" not in attrs
        assert 1.0 < attrs["optguard.elapsed_s"] < 1.5  # the next report after the limit
        assert attrs["optguard.rss_bytes"] > 0
        assert re.fullmatch(r"[\w.-]+:\d+", attrs["optguard.worker"])
    log = log_text(tmp_path)
    for number in (0, 1):
        assert re.search(
            rf"trial={number} Trial #{number} pruned: Trial timeout: 1\.\d+s \(limit 1s\)", log
        )


def test_memory_limit_prunes_with_reason(tmp_path: Path, study_name: str) -> None:
    result = _run(tmp_path, study_name, "hog.py:objective", "--n-trials", "1", "--max-rss", "300MB")
    assert result.returncode == 0, result.stderr
    (trial,) = load_trials(sqlite_url(tmp_path), study_name)
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["optguard.reason"] == "memory"
    assert trial.user_attrs["optguard.limit"] == trial.user_attrs["optguard.limit_bytes"] == 300e6
    assert trial.user_attrs["optguard.peak_mb"] == round(
        trial.user_attrs["optguard.peak_rss_bytes"] / 1e6, 1
    )
    assert trial.user_attrs["optguard.final_mb"] < 300
    assert 300e6 < trial.user_attrs["optguard.rss_bytes"] < 300e6 + 120e6  # one 50 MB step over
    # The cleanup gave the hog's memory back before the final record.
    assert trial.user_attrs["optguard.final_rss_bytes"] < 300e6
    assert re.search(
        r"Trial #0 pruned: Memory limit exceeded: [34]\d\d(\.\d+)?MB \(limit 300MB\)",
        log_text(tmp_path),
    )


@pytest.mark.parametrize("fn", ["objective", "objective_check"])
def test_splits_and_check_prune_without_reports(tmp_path: Path, study_name: str, fn: str) -> None:
    result = _run(tmp_path, study_name, f"splitter.py:{fn}", "--n-trials", "1", "--timeout", "0.5")
    assert result.returncode == 0, result.stderr
    (trial,) = load_trials(sqlite_url(tmp_path), study_name)
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["optguard.reason"] == "timeout"


def test_cleanup_after_complete_pruned_and_failed(tmp_path: Path, study_name: str) -> None:
    result = _run(tmp_path, study_name, "outcomes.py:mixed", "--n-trials", "3")
    assert result.returncode == 0, result.stderr
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    log = log_text(tmp_path)
    for t in trials:
        assert 10e6 < t.user_attrs["optguard.final_rss_bytes"] < 2e9
        match = re.search(
            rf"Trial #{t.number} final memory: (\d+\.\d\d)GB \(freed [\d.]+MB in [\d.]+ms", log
        )
        assert match, log
        assert abs(float(match.group(1)) - t.user_attrs["optguard.final_rss_bytes"] / 1e9) < 0.006
    assert "Trial #2 failed: ValueError: boom in trial 2" in log
    assert trials[2].user_attrs["optguard.error"] == "ValueError: boom in trial 2"
    assert re.search(r"Trial #0 finished: state=COMPLETE value=[\d.e-]+ duration=", log)
    assert "Trial #1 finished: state=PRUNED" in log


@pytest.mark.parametrize(
    ("fn", "error"),
    [
        ("raises", "RuntimeError: second line: the real cause"),
        ("returns_nan", "objective returned NaN"),
        ("returns_text", "objective returned a non-number: str 'not a number'"),
        ("calls_exit", "objective called sys.exit(3)"),
    ],
)
def test_bad_objective_results_fail_the_trial_not_the_worker(
    tmp_path: Path, study_name: str, fn: str, error: str
) -> None:
    # --fail-fast 0: every trial runs; by default the third identical failure ends the run
    result = _run(tmp_path, study_name, f"outcomes.py:{fn}", "--n-trials", "3", "--fail-fast", "0")
    assert result.returncode == 0, result.stderr
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert {t.user_attrs["optguard.error"] for t in trials} == {error}
    assert {t.user_attrs["optguard.worker"] for t in trials} == {trials[0].user_attrs["optguard.worker"]}
    log = log_text(tmp_path)
    assert log.count(f"failed: {error}") == 3
    assert "Worker died" not in log


def test_objective_without_torch_never_gets_torch(tmp_path: Path, study_name: str) -> None:
    result = _run(tmp_path, study_name, "outcomes.py:reports_torch", "--n-trials", "2")
    assert result.returncode == 0, result.stderr
    assert [t.value for t in load_trials(sqlite_url(tmp_path), study_name)] == [0.0, 0.0]


def test_exact_total_over_three_workers_sqlite(tmp_path: Path, study_name: str) -> None:
    result = _run(tmp_path, study_name, "fast.py:paced", "--n-trials", "30", "--workers", "3")
    assert result.returncode == 0, result.stderr
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert len(trials) == 30
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["optguard.worker"] for t in trials}) == 3  # all three took part
    assert "30/30 finished" in result.stdout


@pytest.mark.scenario
@pytest.mark.parametrize("url", [PG_URL, MYSQL_URL], ids=["postgresql", "mysql"])
def test_exact_total_over_three_workers_servers(tmp_path: Path, study_name: str, url: str) -> None:
    import optuna

    try:
        result = _run(
            tmp_path, study_name, "fast.py:objective",
            "--n-trials", "30", "--workers", "3", "--storage", url,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        trials = load_trials(url, study_name)
        assert len(trials) == 30
        assert all(t.state == TrialState.COMPLETE for t in trials)
    finally:
        optuna.delete_study(study_name=study_name, storage=url)


@pytest.mark.scenario
def test_four_workers_hundred_trials_each_no_lock_errors(tmp_path: Path, study_name: str) -> None:
    """The embedded SQLite default under 4 concurrent workers: no "database is locked"."""
    result = _run(tmp_path, study_name, "fast.py:objective", "--n-trials", "400", "--workers", "4")
    assert result.returncode == 0, result.stderr
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert len(trials) == 400
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    assert all(len(t.intermediate_values) == 5 for t in trials)
    log = log_text(tmp_path)
    assert " ERROR " not in log and " WARNING " not in log
    assert "locked" not in log
    outs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.out"))
    assert outs == ""  # nothing on the workers' stdout/stderr either


def test_resume_runs_only_missing_trials(tmp_path: Path, study_name: str) -> None:
    assert _run(tmp_path, study_name, "fast.py:objective", "--n-trials", "4").returncode == 0
    first = load_trials(sqlite_url(tmp_path), study_name)
    result = _run(tmp_path, study_name, "fast.py:objective", "--n-trials", "7", "--workers", "2")
    assert result.returncode == 0, result.stderr
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert len(trials) == 7
    assert [(t.number, t.params, t.value) for t in trials[:4]] == [
        (t.number, t.params, t.value) for t in first
    ]
    again = _run(tmp_path, study_name, "fast.py:objective", "--n-trials", "7")
    assert again.returncode == 0 and len(load_trials(sqlite_url(tmp_path), study_name)) == 7


def test_grep_contract_on_real_logs(tmp_path: Path, study_name: str) -> None:
    _run(tmp_path, study_name, "sleepy.py:objective", "--n-trials", "1", "--timeout", "0.5")
    _run(tmp_path, study_name + "m", "hog.py:objective", "--n-trials", "1", "--max-rss", "250MB")
    files = sorted((tmp_path / "logs").glob("worker_*.log"))
    host = socket.gethostname()
    assert [f.name for f in files] == [
        f"worker_{study_name}_{host}_0.log",
        f"worker_{study_name}m_{host}_0.log",
    ]
    grep = subprocess.run(
        'grep -hE "timeout|Memory limit|final memory" logs/worker_*.log',
        shell=True, cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    lines = grep.stdout.splitlines()
    timeout = r"trial=0 Trial #0 pruned: Trial timeout: \d\.\d+s \(limit 0\.5s\)"
    assert any(re.search(timeout, x) for x in lines)
    assert any(re.search(r"Memory limit exceeded: \d+(\.\d+)?MB \(limit 250MB\)", x) for x in lines)
    assert sum("final memory: " in x for x in lines) == 2
    for f in files:
        text = f.read_text()
        assert "\x1b[" not in text
        for line in text.splitlines():
            assert LINE.match(line), line


def test_password_is_never_shown(tmp_path: Path, study_name: str) -> None:
    """PostgreSQL here trusts any password, so the run succeeds with one in the URL."""
    import optuna

    secret = "hunter2-s3cret"
    url = PG_URL.replace("postgres@", f"postgres:{secret}@")
    try:
        result = _run(tmp_path, study_name, "fast.py:objective", "--n-trials", "2", "--storage", url)
        assert result.returncode == 0, result.stderr
        assert "postgres:***@" in result.stdout
        everything = result.stdout + result.stderr + log_text(tmp_path)
        everything += "".join(p.read_text() for p in (tmp_path / "logs").glob("*.out"))
        assert secret not in everything
    finally:
        optuna.delete_study(study_name=study_name, storage=PG_URL)
    down = _run(tmp_path, study_name, "fast.py:objective", "--n-trials", "1",
                "--storage", f"postgresql://u:{secret}@127.0.0.1:1/test")  # fmt: skip
    assert down.returncode == 3
    assert secret not in down.stdout + down.stderr
    assert "u:***@127.0.0.1:1" in down.stderr


def test_example_config_runs(tmp_path: Path) -> None:
    repo = Path(__file__).parent.parent
    result = run_cli(
        "run", "--config", str(repo / "configs" / "example.toml"),
        "--objective", str(repo / "scripts/examples/kfold.py:objective"),
        "--n-trials", "6", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    trials = load_trials(sqlite_url(tmp_path), "example-kfold")
    assert len(trials) == 6 and all(t.state.is_finished() for t in trials)
    assert len(list((tmp_path / "logs").glob("worker_example-kfold_*.log"))) == 2
