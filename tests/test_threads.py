"""Threads per worker (issue 11): the pure plan in tables, then real runs that probe workers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from optguard.config import resolve_options
from optguard.errors import ConfigError, UsageError
from optguard.threads import (
    THREAD_VARS,
    THREADS_ENV,
    available_cpus,
    default_threads,
    format_cpus,
    plan_threads,
    spawn_affinity,
    split_cpus,
    thread_env,
    worker_summary,
)
from tests.conftest import log_text, objective, run_cli

# -- the pure logic ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpus", "workers", "threads"),
    [(2, 2, 1), (2, 1, 2), (2, 3, 1), (16, 4, 4), (16, 3, 5), (1, 8, 1), (8, 0, 8)],
)
def test_default_threads(cpus: int, workers: int, threads: int) -> None:
    assert default_threads(cpus, workers) == threads


@pytest.mark.parametrize(
    ("environ", "kept"),
    [
        ({}, {}),
        ({"OMP_NUM_THREADS": "3"}, {"OMP_NUM_THREADS": "3"}),
        ({"OMP_NUM_THREADS": "", "MKL_NUM_THREADS": " "}, {}),  # empty: ignored, replaced
        ({"MKL_NUM_THREADS": "2", "BLIS_NUM_THREADS": "4"},
         {"MKL_NUM_THREADS": "2", "BLIS_NUM_THREADS": "4"}),
        ({"PATH": "/bin"}, {}),
    ],
)  # fmt: skip
def test_thread_env_never_overrides_the_user(environ: dict[str, str], kept: dict[str, str]) -> None:
    export, got_kept = thread_env(2, environ)
    assert got_kept == kept
    assert export == {THREADS_ENV: "2", **{v: "2" for v in THREAD_VARS if v not in kept}}
    assert {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"} <= set(THREAD_VARS)


@pytest.mark.parametrize(
    ("cpus", "index", "k", "mine"),
    [
        ((0, 1), 0, 1, (0,)),
        ((0, 1), 1, 1, (1,)),
        ((1, 0), 1, 1, (1,)),  # sorted first
        ((0, 1, 2, 3), 1, 2, (2, 3)),
        ((0, 1, 2), 2, 1, (2,)),
        ((0, 1), 2, 1, (0,)),  # more workers than cores: wraps round
        ((0, 1, 2), 1, 2, (0, 2)),  # 2 workers x 2 > 3 cores: [2, 4) wraps to 2, 0
        ((0, 1), 0, 4, (0, 1)),  # more threads than cores: all of them, once
        ((4, 5, 8, 9), 1, 2, (8, 9)),  # the affinity set, not 0..n
        ((), 0, 1, ()),
    ],
)
def test_split_cpus(cpus: tuple[int, ...], index: int, k: int, mine: tuple[int, ...]) -> None:
    assert split_cpus(cpus, index, k) == mine


@pytest.mark.parametrize(
    ("cpus", "text"),
    [((0,), "0"), ((0, 1), "0-1"), ((0, 1, 2, 3, 6), "0-3,6"), ((6, 0, 1, 1), "0-1,6"), ((), "")],
)
def test_format_cpus(cpus: tuple[int, ...], text: str) -> None:
    assert format_cpus(cpus) == text


@pytest.mark.parametrize(
    ("given", "workers", "pinned", "environ", "described", "worker1"),
    [
        (None, 2, False, {}, "1 thread(s) per worker", None),
        (2, 2, False, {}, "2 thread(s) per worker", None),
        (None, 1, True, {}, "2 thread(s) per worker, cpus 0-1 pinned", (0, 1)),
        (None, 2, True, {}, "1 thread(s) per worker, cpus 0-1 pinned", (1,)),
        (None, 2, False, {"OMP_NUM_THREADS": "4"},
         "1 thread(s) per worker (OMP_NUM_THREADS=4 from the environment)", None),
    ],
)  # fmt: skip
def test_plan_describes_the_choice(
    given: int | None,
    workers: int,
    pinned: bool,
    environ: dict[str, str],
    described: str,
    worker1: tuple[int, ...] | None,
) -> None:
    plan = plan_threads(given, workers, pinned, environ, (1, 0))
    assert plan.describe() == described
    assert plan.cpus_of(1) == worker1
    assert plan.cpus_of(1) == plan.cpus_of(1)  # a replacement (same index): the same cores


@pytest.mark.parametrize(
    ("environ", "cpus", "summary"),
    [
        ({THREADS_ENV: "1", **{v: "1" for v in THREAD_VARS}}, (0,), "threads=1 cpus=0"),
        ({THREADS_ENV: "1", **{v: "1" for v in THREAD_VARS}, "OMP_NUM_THREADS": "3"}, (0, 1),
         "threads=1 (OMP_NUM_THREADS=3 from the environment) cpus=0-1"),
        ({"OMP_NUM_THREADS": "2"}, (0, 1), "threads=2 cpus=0-1"),  # started by hand
        ({}, (0, 1), "threads=unset cpus=0-1"),
    ],
)  # fmt: skip
def test_worker_summary(environ: dict[str, str], cpus: tuple[int, ...], summary: str) -> None:
    assert worker_summary(environ, cpus) == summary


def test_spawn_affinity_is_inherited_and_restored() -> None:
    before = os.sched_getaffinity(0)
    mine = (min(before),)
    probe = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
    with spawn_affinity(mine):
        out = subprocess.run(probe, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(list(mine))
    assert os.sched_getaffinity(0) == before
    with spawn_affinity(None):
        assert os.sched_getaffinity(0) == before


# -- options ---------------------------------------------------------------------------------


def test_options_from_flags_and_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('study = "a"\nobjective = "m:f"\nthreads_per_worker = 3\ncpu_affinity = true\n')
    opts = resolve_options({}, cfg)
    assert (opts.threads_per_worker, opts.cpu_affinity) == (3, True)
    opts = resolve_options({"threads_per_worker": 2, "cpu_affinity": False}, cfg)
    assert (opts.threads_per_worker, opts.cpu_affinity) == (2, False)
    opts = resolve_options({"study": "a", "objective": "m:f"})
    assert (opts.threads_per_worker, opts.cpu_affinity) == (None, False)


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        ("threads_per_worker = 0\n", UsageError, r"threads_per_worker \(in .*\) must be at least"),
        ("threads_per_worker = true\n", ConfigError, "threads_per_worker must be int"),
        ('cpu_affinity = "yes"\n', ConfigError, "cpu_affinity must be bool"),
        ("cpu_affinity = 1\n", ConfigError, "cpu_affinity must be bool"),
    ],
)
def test_bad_config_values(tmp_path: Path, content: str, error: type, message: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('study = "a"\nobjective = "m:f"\n' + content)
    with pytest.raises(error, match=message):
        resolve_options({}, cfg)


def test_flag_below_one_exits_2(tmp_path: Path) -> None:
    result = run_cli(
        "run", "--study", "s", "--objective", objective("threads_probe.py:objective"),
        "--threads-per-worker", "0", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--threads-per-worker must be at least 1, got 0" in result.stderr


# -- real runs -------------------------------------------------------------------------------


def _probe_run(
    tmp_path: Path,
    study: str,
    monkeypatch: pytest.MonkeyPatch,
    *args: str,
    n_trials: int = 2,
    env: dict[str, str] | None = None,
) -> tuple[str, dict[int, list[tuple[str, int, str, str]]]]:
    """Run the probe; its first stdout line and, per worker pid, ``(OMP, ncpus, cpus, joblib's
    cpu_count)`` seen."""
    for var in (*THREAD_VARS, THREADS_ENV):
        monkeypatch.delenv(var, raising=False)
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    result = run_cli(
        "run", "--study", study, "--objective", objective("threads_probe.py:objective"),
        "--workers", "2", "--n-trials", str(n_trials), *args,
        cwd=tmp_path, env={"THREADS_PROBE_DIR": str(probe_dir), **(env or {})},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    seen = {
        int(p.name): [(omp, int(n), cpus, jobs) for omp, n, cpus, jobs in map(str.split, lines)]
        for p in probe_dir.iterdir()
        for lines in [p.read_text().splitlines()]
    }
    assert len(seen) >= 2  # each worker imports the probe, trial or not
    return result.stdout.splitlines()[0], seen


CORES = len(available_cpus())


def test_default_is_cores_over_workers(
    tmp_path: Path, study_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, seen = _probe_run(tmp_path, study_name, monkeypatch)
    expected = default_threads(CORES, 2)  # 1 on the 2-core CI machine
    assert f"2 worker(s), {expected} thread(s) per worker, logs in" in first
    assert {omp for lines in seen.values() for omp, _, _, _ in lines} == {str(expected)}
    assert {n for lines in seen.values() for _, n, _, _ in lines} == {CORES}  # not pinned
    # n_jobs=-1 (joblib, scikit-learn) means the worker's share too, not every core
    assert {jobs for lines in seen.values() for _, _, _, jobs in lines} == {str(expected)}


def test_threads_per_worker_flag(
    tmp_path: Path, study_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, seen = _probe_run(tmp_path, study_name, monkeypatch, "--threads-per-worker", "2")
    assert "2 thread(s) per worker" in first
    assert {omp for lines in seen.values() for omp, _, _, _ in lines} == {"2"}


def test_user_environment_wins(
    tmp_path: Path, study_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, seen = _probe_run(tmp_path, study_name, monkeypatch, env={"OMP_NUM_THREADS": "3"})
    assert "(OMP_NUM_THREADS=3 from the environment)" in first
    assert {omp for lines in seen.values() for omp, _, _, _ in lines} == {"3"}


def test_cpu_affinity_gives_each_worker_its_cores(
    tmp_path: Path, study_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replacements (one trial per worker) get the cores of the worker they replace."""
    first, seen = _probe_run(
        tmp_path, study_name, monkeypatch,
        "--cpu-affinity", "--max-trials-per-worker", "1", n_trials=3,
    )  # fmt: skip
    k = default_threads(CORES, 2)
    assert re.search(rf"{k} thread\(s\) per worker, cpus [0-9,-]+ pinned", first), first
    assert {n for lines in seen.values() for _, n, _, _ in lines} == {min(k, CORES)}
    labels = re.findall(r"worker=(\d+):(\d+)", log_text(tmp_path))
    index_of = {int(pid): int(i) for i, pid in labels}
    assert len(seen) > 2 and set(seen) <= set(index_of)  # replacements were started
    by_index: dict[int, set[str]] = {}
    for pid, lines in seen.items():
        by_index.setdefault(index_of[pid], set()).update(cpus for _, _, cpus, _ in lines)
    assert sorted(by_index) == [0, 1]
    assert all(len(c) == 1 for c in by_index.values()), by_index  # same cores, every worker
    if 2 * k <= CORES:
        assert by_index[0] != by_index[1]  # disjoint slices
