"""What the guard costs, measured side by side with plain Optuna in the same run.

    python scripts/bench.py            # full run, a table (about a minute)
    python scripts/bench.py --json     # the same as one JSON object
    python scripts/bench.py --quick    # smoke mode for CI: seconds, no timing gates

Covers part of issue 5 so far: throughput ratios (1 and 2 workers, embedded SQLite), the cost
of one cooperative check, the post-trial cleanup on a big heap, and `optguard --help`.
Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OBJECTIVE = textwrap.dedent(
    """
    def objective(trial):
        x = trial.suggest_float("x", -10, 10)
        for step in range(5):
            trial.report(x * x, step)
        return x * x
    """
)
PLAIN = textwrap.dedent(
    """
    import sys, optuna
    sys.path.insert(0, sys.argv[3])
    from bench_objective import objective
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="plain", storage=sys.argv[1])
    study.optimize(objective, n_trials=int(sys.argv[2]))
    """
)
BIG_HEAP = textwrap.dedent(
    """
    import gc, sys, time
    from optguard.cleanup import release_memory
    heap = [(i, str(i)) for i in range(int(sys.argv[1]))]
    start = time.perf_counter()
    for _ in range(3):
        gc.collect()
    naive = time.perf_counter() - start
    gc.freeze()
    runs = []
    for _ in range(5):
        runs.append(release_memory().seconds)
    print(naive * 1000, sorted(runs)[2] * 1000)
    """
)


def _timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def throughput(workers: int, trials: int) -> dict[str, float]:
    """Trials/s of `optguard run` and of plain `study.optimize` processes, same storage kind."""
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "bench_objective.py").write_text(OBJECTIVE)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        url = f"sqlite:///{cwd / 'plain.db'}"
        optuna.create_study(study_name="plain", storage=url)
        per_worker = trials // workers
        start = time.perf_counter()
        procs = [
            subprocess.Popen([sys.executable, "-c", PLAIN, url, str(per_worker), str(cwd)], cwd=cwd)
            for _ in range(workers)
        ]
        for proc in procs:
            if proc.wait() != 0:
                raise RuntimeError("plain optuna worker failed")
        plain = time.perf_counter() - start
        guarded = _timed(
            [sys.executable, "-m", "optguard", "run", "--study", "guarded", "--objective",
             str(cwd / "bench_objective.py") + ":objective", "--workers", str(workers),
             "--n-trials", str(per_worker * workers), "--pruner", "none"],
            cwd,
        )  # fmt: skip
    n = per_worker * workers
    return {"plain_trials_per_s": n / plain, "optguard_trials_per_s": n / guarded,
            "ratio": plain / guarded}  # fmt: skip


def check_us(repeat: int) -> float:
    import optuna

    from optguard.guard import TrialGuard
    from optguard.limits import Limits

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    guard = TrialGuard(optuna.create_study().ask(), Limits())
    samples = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        for _ in range(100):
            guard.check()
        samples.append((time.perf_counter_ns() - start) / 100 / 1000)
    return statistics.median(samples)


def cleanup_big_heap(objects: int) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", BIG_HEAP, str(objects)], capture_output=True, text=True, check=True
    ).stdout.split()
    return float(out[0]), float(out[1])


def help_s(repeat: int) -> float:
    return statistics.median(
        _timed([sys.executable, "-m", "optguard", "--help"], REPO) for _ in range(repeat)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="smoke mode: seconds, small sizes")
    args = parser.parse_args()
    quick = args.quick
    trials = 20 if quick else 400
    results: dict[str, Any] = {"quick": quick, "machine": f"{os.cpu_count()} cores"}
    one = throughput(1, trials)
    two = throughput(2, trials)
    results["throughput_ratio_1w"] = round(one["ratio"], 3)
    results["throughput_ratio_2w"] = round(two["ratio"], 3)
    results["throughput"] = {"1w": one, "2w": two}
    results["check_us"] = round(check_us(20 if quick else 200), 2)
    naive, cleanup = cleanup_big_heap(100_000 if quick else 5_000_000)
    results["cleanup_ms_big_heap"] = round(cleanup, 3)
    results["naive_gc_ms_big_heap"] = round(naive, 1)
    results["help_s"] = round(help_s(2 if quick else 7), 3)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    rows = [
        ("throughput_ratio_1w", results["throughput_ratio_1w"], ">= 0.9"),
        ("throughput_ratio_2w", results["throughput_ratio_2w"], ">= 0.9"),
        ("check_us", results["check_us"], "< 20"),
        ("cleanup_ms_big_heap", results["cleanup_ms_big_heap"], "< 50"),
        ("naive 3x gc.collect ms", results["naive_gc_ms_big_heap"], "(reference)"),
        ("help_s", results["help_s"], "< 0.3"),
    ]
    print(f"{'measure':<26}{'value':>12}  target")
    for name, value, target in rows:
        print(f"{name:<26}{value:>12}  {target}")


if __name__ == "__main__":
    main()
