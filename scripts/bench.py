"""What the guard costs and how close it gets to its limits, side by side with plain Optuna.

    python scripts/bench.py            # full run, a table (about 6 minutes on 2 cores)
    python scripts/bench.py --json     # the same as one JSON object
    python scripts/bench.py --quick    # smoke mode for CI: small sizes, no timing gates
    python scripts/bench.py --real     # real objectives (scripts/real_objectives.py), 2 workers
                                       # (their packages: pip install -e ".[bench]")
    python scripts/bench.py --scale    # 12 hosts x 3 workers on one study, a private PostgreSQL
                                       # (max_connections 30), fresh and with 20,000 trials

Every ratio compares optguard with plain ``study.optimize`` processes measured in the same run,
on the same kind of storage and with the same number of processes. Throughput is trials per
second between the first trial's start and the last trial's end, read from the storage, so
process start-up (reported on its own as ``first_trial_s``) weighs on neither side. Timings
are reported, never asserted: see BENCHMARKS.md for a full run and the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("OPTGUARD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
OBJECTIVES = textwrap.dedent(
    '''
    import os, time
    import optguard
    from optguard.memory import current_rss

    def steps(trial):
        """5 reports, each after BENCH_STEP_S of sleep (0: a trivial objective)."""
        x = trial.suggest_float("x", -10, 10)
        step_s = float(os.environ.get("BENCH_STEP_S", "0"))
        for step in range(5):
            if step_s:
                time.sleep(step_s)
            trial.report(x * x, step)
        return x * x

    def cooperative(trial):
        trial.suggest_float("x", 0, 1)
        while True:
            time.sleep(0.1)
            optguard.check(trial)

    def sleep_hang(trial):
        trial.suggest_float("x", 0, 1)
        time.sleep(3600)

    def c_hang(trial):
        trial.suggest_float("x", 0, 1)
        return float(sum(range(10**13)))  # hours in C with the GIL held

    def leak(trial):
        """BENCH_LEAK_MB_S of written memory, in 100 chunks a second, no checks."""
        trial.suggest_float("x", 0, 1)
        chunk = int(float(os.environ["BENCH_LEAK_MB_S"]) * 1e6 / 100)
        held, start, n = [], time.monotonic(), 0
        while True:
            held.append(b"\\x01" * chunk)
            n += 1
            delay = start + n / 100 - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    SURVIVORS = []

    def fragment(trial):
        """200k buffers of ~1 KB (200 MB of C heap), 20 of which outlive the trial."""
        x = trial.suggest_float("x", 0, 1)
        trial.set_user_attr("rss_at_start", current_rss())
        buffers = [b"\\x01" * (900 + i % 200) for i in range(200_000)]
        SURVIVORS.extend(buffers[::10_000])
        del buffers
        return x
    '''
)
# Plain Optuna, as a user runs it: load the study, optimize. No pruner: optguard's side runs
# with --pruner none, so both do the same work per trial.
PLAIN = textwrap.dedent(
    """
    import importlib, sys, optuna
    sys.path.insert(0, sys.argv[4])
    objectives = importlib.import_module(sys.argv[7])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sys.argv[1].startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend
        storage = optuna.storages.JournalStorage(JournalFileBackend(sys.argv[1][8:]))
    else:
        storage = sys.argv[1]
    study = optuna.load_study(study_name=sys.argv[2], storage=storage,
                              pruner=optuna.pruners.NopPruner())
    study.optimize(getattr(objectives, sys.argv[5]), n_trials=int(sys.argv[3]),
                   gc_after_trial=sys.argv[6] == "gc")
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


class Bench:
    """One scratch directory holding the objectives and the SQLite files of every run."""

    def __init__(self, cwd: Path, quick: bool) -> None:
        self.cwd = cwd
        self.quick = quick
        (cwd / "bench_objectives.py").write_text(OBJECTIVES)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)

    def url(self, name: str) -> str:
        return f"sqlite:///{self.cwd / name}.db"

    def trials(self, url: str, study: str) -> list[Any]:
        import optuna

        return optuna.load_study(study_name=study, storage=_storage(url)).get_trials(
            deepcopy=False
        )

    def optguard(
        self, fn: str, n: int, workers: int = 1, *flags: str, url: str | None = None,
        env: dict[str, str] | None = None, study: str | None = None,
        source: Path | None = None,
    ) -> tuple[list[Any], float]:
        """``optguard run``; returns the trials and the launch time (``time.time()``)."""
        study = study or f"g-{uuid.uuid4().hex[:8]}"
        url = url or self.url(study)
        source = source or self.cwd / "bench_objectives.py"
        launched = time.time()
        subprocess.run(
            [sys.executable, "-m", "optguard", "run", "--study", study, "--storage", url,
             "--objective", f"{source}:{fn}", "--workers", str(workers),
             "--n-trials", str(n), "--pruner", "none", *flags],
            cwd=self.cwd, capture_output=True, env=_environ(env), check=False,
        )  # fmt: skip
        return self.trials(url, study), launched

    def plain(
        self, fn: str, n: int, workers: int = 1, gc_after_trial: bool = False,
        env: dict[str, str] | None = None, source: Path | None = None,
        direction: str = "minimize", url: str | None = None,
    ) -> tuple[list[Any], float]:
        """The same objective through plain ``study.optimize`` in ``workers`` processes."""
        import optuna

        study = f"p-{uuid.uuid4().hex[:8]}"
        url = url or self.url(study)
        source = source or self.cwd / "bench_objectives.py"
        optuna.create_study(study_name=study, storage=_storage(url), direction=direction)
        launched = time.time()
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", PLAIN, url, study, str(n // workers), str(source.parent),
                 fn, "gc" if gc_after_trial else "-", source.stem],
                cwd=self.cwd, env=_environ(env),
            )  # fmt: skip
            for _ in range(workers)
        ]
        if any(proc.wait() != 0 for proc in procs):
            raise RuntimeError("a plain optuna process failed")
        return self.trials(url, study), launched


def _storage(url: str) -> Any:
    """A URL, or ``journal:PATH`` for Optuna's journal file (its storage for parallel
    processes on one machine, which has no URL)."""
    if not url.startswith("journal:"):
        return url
    import optuna
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:"):]))


def _environ(extra: dict[str, str] | None) -> dict[str, str]:
    """This process's environment less the thread variables (a user's default environment,
    on both sides: optguard's own choice must not reach the plain side), plus ``extra``."""
    from optguard.threads import THREAD_VARS

    base = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    return {**base, **(extra or {})}


def _rate(trials: list[Any]) -> float:
    """Trials per second from the first start to the last end."""
    done = [t for t in trials if t.datetime_complete is not None]
    if len(done) < 2:
        raise RuntimeError(f"{len(done)} finished trial(s): the run failed, nothing to time")
    span = max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
    return len(done) / span.total_seconds()


def _duration(trial: Any) -> float:
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def throughput(
    b: Bench, workers: int, n: int, step_s: float = 0.0, journal: bool = False,
    url: str | None = None, flags: tuple[str, ...] = (),
) -> dict[str, float]:
    """optguard against plain Optuna on SQLite (or both on the database server ``url``,
    where optguard's workers go through their supervisor: ``optguard.gateway``); with
    ``journal``, plain Optuna on its journal file too (its recommended storage for processes
    on one machine), as a reference."""
    env = {"BENCH_STEP_S": str(step_s)}
    plain = _rate(b.plain("steps", n, workers, env=env, url=url)[0])
    guarded = _rate(b.optguard("steps", n, workers, *flags, env=env, url=url)[0])
    result = {"plain_trials_per_s": round(plain, 2), "optguard_trials_per_s": round(guarded, 2),
              "ratio": round(guarded / plain, 3)}  # fmt: skip
    if journal:
        path = b.cwd / f"journal-{uuid.uuid4().hex[:8]}.log"
        rate = _rate(b.plain("steps", n, workers, env=env, url=f"journal:{path}")[0])
        result["plain_journal_trials_per_s"] = round(rate, 2)
    return result


def check_us(repeat: int) -> float:
    import optuna

    from optguard.guard import TrialGuard
    from optguard.limits import Limits

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


FAST = ("--timeout", "1", "--grace", "1", "--kill-after", "1")
# Left out by --quick: each costs a hang of seconds, and its code path is one --quick runs
# with another objective or size.
SLOW = {
    "throughput_1s", "throughput_pg_1s", "latency_s_sleep", "latency_s_c_hang",
    "overshoot_mb_200",
}


def latency(b: Bench, fn: str, repeat: int) -> dict[str, Any]:
    """Seconds past a 1 s time limit until the trial ended (grace 1 s, kill after 1 s)."""
    seconds = []
    for _ in range(repeat):
        trials, _ = b.optguard(fn, 1, 1, *FAST)
        trial = trials[0]
        seconds.append(_duration(trial) - 1.0)
        how = trial.user_attrs.get("optguard.enforcement")
    return {"median_s": round(statistics.median(seconds), 3), "runs": [round(s, 3) for s in seconds],
            "enforcement": how}  # fmt: skip


def overshoot(b: Bench, mb_per_s: int, repeat: int) -> dict[str, Any]:
    """Exact peak (the kernel's VmHWM) above a 500 MB limit for a leak with no checks."""
    limit = 500_000_000
    over = []
    for _ in range(repeat):
        trials, _ = b.optguard(
            "leak", 1, 1, "--max-rss", "500MB", "--kill-after", "1",
            env={"BENCH_LEAK_MB_S": str(mb_per_s)},
        )  # fmt: skip
        over.append((trials[0].user_attrs.get("optguard.peak_rss_bytes", 0) - limit) / 1e6)
        how = trials[0].user_attrs.get("optguard.enforcement")
    return {"median_mb": round(statistics.median(over), 1), "runs": [round(o, 1) for o in over],
            "target_mb": mb_per_s * 0.2, "enforcement": how}  # fmt: skip


def drift(b: Bench, n: int) -> dict[str, float]:
    """RSS growth over ``n`` trials that fragment the C heap: optguard's cleanup against plain
    Optuna with ``gc_after_trial=True``, both measured by the objective at each trial start."""

    def growth(trials: list[Any]) -> float:
        by_number = sorted(trials, key=lambda t: t.number)
        return (by_number[-1].user_attrs["rss_at_start"] - by_number[0].user_attrs["rss_at_start"]) / 1e6

    plain = growth(b.plain("fragment", n + 1, gc_after_trial=True)[0])
    guarded = growth(b.optguard("fragment", n + 1)[0])
    return {"plain_mb": round(plain, 1), "optguard_mb": round(guarded, 1),
            "ratio": round(guarded / plain, 3) if plain > 0 else float("nan")}  # fmt: skip


def first_trial(b: Bench) -> dict[str, float]:
    """Seconds from launching the command to the first trial's start, optguard and plain."""
    trials, launched = b.optguard("steps", 1)
    plain, plain_launched = b.plain("steps", 1)
    return {"optguard_s": round(trials[0].datetime_start.timestamp() - launched, 3),
            "plain_s": round(plain[0].datetime_start.timestamp() - plain_launched, 3)}  # fmt: skip


def supervisor_cpu(b: Bench, window_s: float, warmup_s: float) -> dict[str, float]:
    """CPU of the ``optguard run`` process itself while 2 workers run 100 ms trials."""
    import psutil

    study = f"cpu-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "optguard", "run", "--study", study, "--storage", b.url(study),
         "--objective", f"{b.cwd / 'bench_objectives.py'}:steps", "--workers", "2",
         "--n-trials", "1000000", "--pruner", "none"],
        cwd=b.cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "BENCH_STEP_S": "0.02"},
    )  # fmt: skip
    try:
        time.sleep(warmup_s)  # start-up (imports, workers loading) is not the steady cost
        me = psutil.Process(proc.pid)
        before, start = sum(me.cpu_times()[:2]), time.monotonic()
        time.sleep(window_s)
        used, wall = sum(me.cpu_times()[:2]) - before, time.monotonic() - start
    finally:
        proc.send_signal(signal.SIGINT)  # stop: the running trials finish
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()  # its workers die with it (PR_SET_PDEATHSIG)
            proc.wait()
    done = len([t for t in b.trials(b.url(study), study) if t.state.is_finished()])
    return {"pct_of_one_core": round(used / wall * 100, 2), "window_s": round(wall, 1),
            "trials": done}  # fmt: skip


def scaling(b: Bench, trials_per_worker: int, counts: tuple[int, ...]) -> dict[str, Any]:
    """Trials/s of 50 ms trials (5 x 10 ms sleeps) with 1, 2 and 4 workers."""
    import optuna

    env = {"BENCH_STEP_S": "0.01"}
    results: dict[str, Any] = {}
    for backend in ("sqlite", "postgresql"):
        row: dict[str, Any] = {}
        for workers in counts:
            study = f"scale-{uuid.uuid4().hex[:8]}"
            url = PG_URL if backend == "postgresql" else None
            try:
                trials, _ = b.optguard(
                    "steps", trials_per_worker * workers, workers, url=url, env=env, study=study
                )
                row[f"{workers}w"] = round(_rate(trials), 2)
            except Exception as exc:  # noqa: BLE001 - a server that is down: report, go on
                row[f"{workers}w"] = f"skipped: {type(exc).__name__}: {str(exc)[:80]}"
            if url is not None:
                try:
                    optuna.delete_study(study_name=study, storage=url)
                except Exception:  # noqa: BLE001 - nothing to delete when the run failed
                    pass
        results[backend] = row
    return results


def run_all(quick: bool) -> dict[str, Any]:
    r: dict[str, Any] = {"quick": quick, "machine": f"{os.cpu_count()} cores"}
    n = 20 if quick else 400
    with tempfile.TemporaryDirectory() as tmp:
        b = Bench(Path(tmp), quick)
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("throughput_1w", lambda: throughput(b, 1, n, journal=True)),
            ("throughput_2w", lambda: throughput(b, 2, n, journal=True)),
            ("throughput_4w", lambda: throughput(b, 4, n, journal=True)),
            ("throughput_1s", lambda: throughput(b, 1, 2 if quick else 12, step_s=0.2)),
            ("throughput_pg_1w", lambda: throughput(b, 1, n // 2, url=PG_URL)),
            ("throughput_pg_4w", lambda: throughput(b, 4, n // 2, url=PG_URL)),
            ("throughput_pg_4w_no_gateway",
             lambda: throughput(b, 4, n // 2, url=PG_URL, flags=("--no-gateway",))),
            ("throughput_pg_1s", lambda: throughput(b, 4, 8 if quick else 24, step_s=0.2,
                                                     url=PG_URL)),
            ("check_us", lambda: round(check_us(20 if quick else 200), 2)),
            ("cleanup", lambda: cleanup_big_heap(100_000 if quick else 5_000_000)),
            ("latency_s_cooperative", lambda: latency(b, "cooperative", 1 if quick else 3)),
            ("latency_s_sleep", lambda: latency(b, "sleep_hang", 1 if quick else 3)),
            ("latency_s_c_hang", lambda: latency(b, "c_hang", 1 if quick else 3)),
            ("overshoot_mb_200", lambda: overshoot(b, 200, 1 if quick else 3)),
            ("overshoot_mb_1000", lambda: overshoot(b, 1000, 1 if quick else 3)),
            ("drift", lambda: drift(b, 3 if quick else 50)),
            ("help_s", lambda: help_s(2 if quick else 7)),
            ("first_trial_s", lambda: first_trial(b)),
            ("supervisor_cpu", lambda: supervisor_cpu(b, 2.0 if quick else 60.0, 3.0 if quick else 5.0)),
            ("scaling", lambda: scaling(b, 3 if quick else 40, (1,) if quick else (1, 2, 4))),
        ]
        for key, measure in steps:
            r[key] = None if quick and key in SLOW else measure()
    def headline(key: str, source: str, field: str) -> None:
        """The target's one number at ``key``; the whole measure stays at ``source``."""
        r[key] = None if r[source] is None else r[source][field]

    for runs in ("1w", "2w", "4w", "1s", "pg_1w", "pg_4w", "pg_4w_no_gateway", "pg_1s"):
        headline(f"throughput_ratio_{runs}", f"throughput_{runs}", "ratio")
    r["naive_gc_ms_big_heap"], r["cleanup_ms_big_heap"] = (round(v, 3) for v in r.pop("cleanup"))
    for key in ("latency_s_cooperative", "latency_s_sleep", "latency_s_c_hang"):
        r[key + "_detail"] = r[key]
        headline(key, key + "_detail", "median_s")
    for key in ("overshoot_mb_200", "overshoot_mb_1000"):
        r[key + "_detail"] = r[key]
        headline(key, key + "_detail", "median_mb")
    r["drift_ratio"] = r["drift"]["ratio"]
    r["supervisor_cpu_pct"] = r["supervisor_cpu"]["pct_of_one_core"]
    first = r.pop("first_trial_s")
    r["first_trial_s"], r["first_trial_plain_s"] = first["optguard_s"], first["plain_s"]
    return r


REAL = REPO / "scripts" / "real_objectives.py"


def real_case(b: Bench, name: str, n: int, workers: int) -> dict[str, Any]:
    """One objective of ``real_objectives``: ``n`` trials in ``workers`` processes, plain
    Optuna first, then optguard, each in the environment a user has (no thread variables)."""
    import importlib.util

    import real_objectives

    _, direction, packages = real_objectives.CASES[name]
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        return {"skipped": f"not installed: {', '.join(missing)} (pip install -e '.[bench]')"}
    sides: dict[str, dict[str, float]] = {}
    for side in ("plain", "optguard"):
        start = time.monotonic()
        if side == "plain":
            trials, _ = b.plain(name, n, workers, source=REAL, direction=direction)
        else:
            trials, _ = b.optguard(name, n, workers, "--direction", direction, source=REAL)
        wall = time.monotonic() - start
        done = [t for t in trials if t.state.is_finished()]
        if len(done) != n or any(t.state.name != "COMPLETE" for t in done):
            states = sorted({t.state.name for t in trials})
            raise RuntimeError(f"{name} under {side}: {len(done)}/{n} trials finished, {states}")
        sides[side] = {"span_s": len(done) / _rate(trials), "wall_s": wall}
    plain, guarded = sides["plain"], sides["optguard"]
    return {
        "plain_span_s": round(plain["span_s"], 2),
        "optguard_span_s": round(guarded["span_s"], 2),
        "ratio": round(plain["span_s"] / guarded["span_s"], 3),
        "plain_wall_s": round(plain["wall_s"], 2),
        "optguard_wall_s": round(guarded["wall_s"], 2),
        "wall_ratio": round(plain["wall_s"] / guarded["wall_s"], 3),
    }


def run_real(quick: bool, only: list[str] | None = None) -> dict[str, Any]:
    """``--real``: each objective of ``real_objectives`` (or those in ``only``) under plain
    Optuna and optguard, 2 workers on the same kind of storage; ratio = plain time / optguard
    time (>= 1.0 means optguard is at least as fast)."""
    sys.path.insert(0, str(REAL.parent))
    import real_objectives

    r: dict[str, Any] = {"quick": quick, "machine": f"{os.cpu_count()} cores", "workers": 2}
    n = 2 if quick else 16
    r["trials"] = n
    with tempfile.TemporaryDirectory() as tmp:
        b = Bench(Path(tmp), quick)
        for name in only or real_objectives.CASES:
            r[name] = real_case(b, name, n, 2)
    return r


def help_s(repeat: int) -> float:
    def once() -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "optguard", "--help"], cwd=REPO, check=True,
                       capture_output=True)  # fmt: skip
        return time.perf_counter() - start

    return round(statistics.median(once() for _ in range(repeat)), 3)


TABLE = [
    ("throughput_ratio_1w", ">= 0.9"),
    ("throughput_ratio_2w", ">= 0.9"),
    ("throughput_ratio_4w", ">= 0.95"),
    ("throughput_ratio_1s", ">= 0.99"),
    ("check_us", "< 20"),
    ("cleanup_ms_big_heap", "< 50"),
    ("naive_gc_ms_big_heap", "(reference)"),
    ("latency_s_cooperative", "<= 0.2"),
    ("latency_s_sleep", "<= grace + 1 = 2"),
    ("latency_s_c_hang", "<= grace + kill + 1 = 3"),
    ("overshoot_mb_200", "<= 40"),
    ("overshoot_mb_1000", "<= 200"),
    ("drift_ratio", "<= 0.2"),
    ("help_s", "< 0.3"),
    ("first_trial_s", "(report)"),
    ("first_trial_plain_s", "(reference)"),
    ("supervisor_cpu_pct", "< 2"),
]


# -- --scale: many hosts on one study, on a private PostgreSQL server -------------------------

SCALE_OBJECTIVE = textwrap.dedent(
    '''
    import os, time

    def short(trial):
        """A short trial: one parameter, BENCH_SCALE_SLEEP_S of sleep."""
        x = trial.suggest_float("x", -10, 10)
        time.sleep(float(os.environ.get("BENCH_SCALE_SLEEP_S", "0.03")))
        return x * x
    '''
)
SCALE_MAX_CONNECTIONS = 30


def preload_trials(url: str, study: str, n: int, batch: int = 5000) -> int:
    """Insert ``n`` finished COMPLETE trials (one float param ``x``, one value) straight into
    Optuna's tables, a few ``executemany`` batches: 20,000 trials in seconds, where asking
    and telling them would take many minutes. Returns the count Optuna reads back."""
    import random
    from datetime import datetime, timedelta

    import optuna
    import sqlalchemy as sa
    from optuna.distributions import FloatDistribution, distribution_to_json
    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    engine = sa.create_engine(url)
    trials_t, values_t = models.TrialModel.__table__, models.TrialValueModel.__table__
    params_t = models.TrialParamModel.__table__
    dist = distribution_to_json(FloatDistribution(-10, 10))
    rng = random.Random(0)
    xs = [rng.uniform(-10, 10) for _ in range(n)]
    begin = datetime.now() - timedelta(hours=1)  # Optuna's own clock: naive local time
    try:
        with engine.begin() as conn:
            study_id = conn.execute(
                sa.select(models.StudyModel.__table__.c.study_id).where(
                    models.StudyModel.__table__.c.study_name == study
                )
            ).scalar_one()
            first = conn.execute(
                sa.select(sa.func.count()).select_from(trials_t)
                .where(trials_t.c.study_id == study_id)
            ).scalar_one()  # fmt: skip
            for lo in range(0, n, batch):
                conn.execute(trials_t.insert(), [
                    {"number": first + i, "study_id": study_id, "state": TrialState.COMPLETE,
                     "datetime_start": begin + timedelta(milliseconds=10 * i),
                     "datetime_complete": begin + timedelta(milliseconds=10 * i + 5)}
                    for i in range(lo, min(n, lo + batch))
                ])  # fmt: skip
            ids = conn.execute(
                sa.select(trials_t.c.trial_id, trials_t.c.number)
                .where(trials_t.c.study_id == study_id, trials_t.c.number >= first)
                .order_by(trials_t.c.number)
            ).all()  # fmt: skip
            finite = models.TrialValueModel.TrialValueType.FINITE
            for lo in range(0, n, batch):
                chunk = ids[lo : lo + batch]
                conn.execute(values_t.insert(), [
                    {"trial_id": tid, "objective": 0, "value": xs[num - first] ** 2,
                     "value_type": finite} for tid, num in chunk
                ])  # fmt: skip
                conn.execute(params_t.insert(), [
                    {"trial_id": tid, "param_name": "x", "param_value": xs[num - first],
                     "distribution_json": dist} for tid, num in chunk
                ])  # fmt: skip
    finally:
        engine.dispose()
    storage = optuna.storages.RDBStorage(url)
    try:
        study_obj = optuna.load_study(study_name=study, storage=storage)
        done = study_obj.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return len(done)
    finally:
        storage.remove_session()
        storage.engine.dispose()


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if len(values) < 2:
        return {"p50": None, "p95": None, "p99": None, "n": len(values)}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(q[49], 2), "p95": round(q[94], 2), "p99": round(q[98], 2),
            "n": len(values)}  # fmt: skip


def claim_timing(url: str, study: str, n: int) -> dict[str, float | None]:
    """Milliseconds of one claim (the study-wide lock, the count against ``--n-trials`` and
    the trial's creation: what every worker of every host waits for, one at a time), taken
    ``n`` times on the study after its case, each trial finished before the next claim."""
    from optuna.trial import TrialState

    from optguard.storage import TrialSlots, open_storage

    storage = open_storage(url, gateway=True)
    slots = TrialSlots(storage, study)
    times = []
    try:
        for _ in range(n):
            start = time.perf_counter()
            claimed = slots.claim_row(10**9, {"optguard.worker": "bench:claims"})
            times.append((time.perf_counter() - start) * 1000)
            if claimed is not None:
                storage.set_trial_state_values(claimed[0], TrialState.COMPLETE, [0.0])
    finally:
        slots.close()
        storage.engine.dispose()
    return _percentiles(times)


def _scale_rows(url: str, study: str) -> list[tuple[int, str, Any, Any, str | None]]:
    """(number, state, start, complete, optguard.worker) of every trial, read with one query
    (no FrozenTrial per row: the study may hold 20,000 more)."""
    import sqlalchemy as sa
    from optuna.storages._rdb import models

    t, s = models.TrialModel.__table__, models.StudyModel.__table__
    a = models.TrialUserAttributeModel.__table__
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(t.c.number, t.c.state, t.c.datetime_start, t.c.datetime_complete,
                          a.c.value_json)
                .join(s, s.c.study_id == t.c.study_id)
                .outerjoin(a, sa.and_(a.c.trial_id == t.c.trial_id, a.c.key == "optguard.worker"))
                .where(s.c.study_name == study)
            ).all()  # fmt: skip
    finally:
        engine.dispose()
    return [(num, getattr(state, "name", str(state)), start, end,
             json.loads(worker) if worker else None)
            for num, state, start, end, worker in rows]  # fmt: skip


def _host_command(index: int, study: str, url: str, total: int, workers: int, source: Path,
                  log_dir: Path, extra: tuple[str, ...]) -> list[str]:  # fmt: skip
    """One "host" (``scale-hostK``, ``private_pg.as_host``) running ``optguard run``."""
    import private_pg

    run = [sys.executable, "-m", "optguard", "run", "--study", study, "--storage", url,
           "--objective", f"{source}:short", "--workers", str(workers), "--n-trials", str(total),
           "--sampler", "random", "--pruner", "none", "--log-dir", str(log_dir),
           *extra]  # fmt: skip
    return private_pg.as_host(f"scale-host{index}", run)


def scale_case(
    url: str, root: Path, hosts: int, workers: int, trials: int, preload: int,
    sleep_s: float, case_timeout_s: float, max_connections: int = SCALE_MAX_CONNECTIONS,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:  # fmt: skip
    """``hosts`` concurrent ``optguard run --workers W`` on one study (created here, with
    ``preload`` finished trials already in it), all with the study-wide total ``preload +
    trials``; what it took, read from the storage and the server's statistics."""
    import optuna
    import private_pg

    study = f"scale-{uuid.uuid4().hex[:8]}"
    case_dir = root / study
    source = case_dir / "scale_objective.py"
    case_dir.mkdir()
    source.write_text(SCALE_OBJECTIVE)
    storage = optuna.storages.RDBStorage(url)
    optuna.create_study(study_name=study, storage=storage, direction="minimize")
    storage.remove_session()
    storage.engine.dispose()
    result: dict[str, Any] = {"study": study, "hosts": hosts, "workers_per_host": workers,
                              "trials": trials, "preloaded": 0}  # fmt: skip
    if preload:
        start = time.monotonic()
        result["preloaded"] = preload_trials(url, study, preload)
        result["preload_s"] = round(time.monotonic() - start, 1)
        if result["preloaded"] != preload:
            raise RuntimeError(f"preloaded {preload} trials, Optuna reads {result['preloaded']}")
    total = preload + trials
    with private_pg.Probe(url) as probe:
        probe.reset_statements()
        xacts_before = probe.transactions()
        procs: list[subprocess.Popen[bytes]] = []
        outputs: list[Path] = []
        env = {**_environ(None), "BENCH_SCALE_SLEEP_S": str(sleep_s)}
        launched, launched_at = time.monotonic(), time.time()
        roots: dict[str, int] = {}  # host name -> its pid, for the per-host peak
        group_of = private_pg.namespace_groups(roots)
        with private_pg.ConnectionSampler(url, interval_s=0.05, group_of=group_of) as sampler:
            for k in range(hosts):
                host_dir = case_dir / f"host{k}"
                host_dir.mkdir()
                outputs.append(host_dir / "stderr.txt")
                with open(host_dir / "stdout.txt", "wb") as out, open(outputs[-1], "wb") as err:
                    procs.append(subprocess.Popen(
                        _host_command(k, study, url, total, workers, source, host_dir / "logs",
                                      extra),
                        cwd=host_dir, env=env, stdout=out, stderr=err, start_new_session=True,
                    ))  # fmt: skip
                roots[f"scale-host{k}"] = procs[-1].pid
            codes: list[int | str] = []
            deadline = launched + case_timeout_s
            try:
                for proc in procs:
                    try:
                        codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the host's tree
                        proc.wait()
                        codes.append(f"killed after {case_timeout_s:g}s")
            finally:  # the bench itself interrupted: no host outlives it
                for proc in procs:
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
        wall = time.monotonic() - launched
        time.sleep(0.5)  # the exited backends' statistics reach pg_stat_database
        statements = probe.statement_calls()
        top = probe.statements(8)
        xacts = probe.transactions() - xacts_before
    rows = _scale_rows(url, study)
    claims = claim_timing(url, study, 20 if trials < 100 else 200)  # after the rows are read
    new = [r for r in rows if r[0] >= preload]
    states: dict[str, int] = {}
    for r in new:
        states[r[1]] = states.get(r[1], 0) + 1
    finished = [r for r in new if r[1] in ("COMPLETE", "PRUNED", "FAIL") and r[3] is not None]
    gaps: list[float] = []
    by_worker: dict[str, list[tuple[Any, Any]]] = {}
    for r in finished:
        if r[4]:
            by_worker.setdefault(r[4], []).append((r[2], r[3]))
    for runs in by_worker.values():
        runs.sort()
        gaps += [(nxt[0] - cur[1]).total_seconds() * 1000 for cur, nxt in zip(runs, runs[1:])]
    span = (max(r[3] for r in finished) - min(r[2] for r in finished)).total_seconds() \
        if len(finished) >= 2 else 0.0  # fmt: skip
    errors = {d.name: private_pg.connection_errors([d / "stderr.txt",
                                                    *sorted((d / "logs").glob("*.log"))])
              for d in sorted(case_dir.glob("host*"), key=lambda d: int(d.name[4:]))}  # fmt: skip
    n = max(1, len(finished))
    result.update(
        n_trials=total,
        finished=len(finished),
        states=states,
        running_or_waiting=states.get("RUNNING", 0) + states.get("WAITING", 0),
        exact=len(finished) == trials and len(rows) == total
        and not states.get("RUNNING") and not states.get("WAITING"),
        trials_per_s=round(len(finished) / span, 2) if span > 0 else None,
        span_s=round(span, 2),
        wall_s=round(wall, 1),
        # launch -> the first new trial's start (Optuna's naive local clock, as time.time())
        first_trial_s=round(min(r[2] for r in new).timestamp() - launched_at, 2)
        if new else None,  # fmt: skip
        peak_connections=sampler.result.peak_total,  # to the study's database: the hosts'
        peak_per_host=max(sampler.result.peak_by_group.values(), default=None),
        connections=sampler.result.as_dict(),
        max_connections=max_connections,
        ask_latency_ms=_percentiles(gaps),
        claim_ms=claims,
        workers_seen=len(by_worker),
        statements_per_trial=round(statements / n, 1),
        transactions_per_trial=round(xacts / n, 1),
        statements=statements,
        transactions=xacts,
        top_statements=[{"calls": c, "per_trial": round(c / n, 2),
                         "query": " ".join(q.split())[:200]}
                        for c, q in top],  # fmt: skip
        host_exit_codes=codes,
        hosts_failed=sum(code != 0 for code in codes),
        connection_error_lines=sum(len(lines) for lines in errors.values()),
        hosts_with_connection_errors=sum(bool(lines) for lines in errors.values()),
        connection_errors=[f"{host}/{line}" for host, lines in errors.items()
                           for line in lines][:20],
    )
    return result


def run_scale(args: argparse.Namespace) -> dict[str, Any]:
    """``--scale``: the same hosts twice on a private server with ``max_connections`` 30,
    first on a fresh study, then on one already holding ``--preload`` finished trials."""
    sys.path.insert(0, str(REPO / "scripts"))
    import shutil

    import optuna
    import private_pg

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if shutil.which("unshare") is None or not private_pg.available():
        raise SystemExit("--scale needs unshare, root (UTS namespaces) and PostgreSQL binaries")
    # A SIGTERM (timeout(1), a CI job cancelled) unwinds like Ctrl+C: the hosts are killed,
    # the private server stopped and its directory removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    quick = args.quick
    hosts = args.hosts or (3 if quick else 12)
    workers = args.workers_per_host or (1 if quick else 3)
    trials = args.trials or (12 if quick else 360)
    preload = args.preload if args.preload is not None else (300 if quick else 20_000)
    limit = args.max_connections
    r: dict[str, Any] = {"quick": quick, "machine": f"{os.cpu_count()} cores",
                         "max_connections": limit, "sleep_s": args.sleep}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, private_pg.private_postgres(
        max_connections=limit
    ) as url:
        for key, pre in (("fresh", 0), ("preloaded", preload)):
            if key == "preloaded" and not pre:
                continue
            r[key] = scale_case(url, Path(tmp), hosts, workers, trials, pre, args.sleep,
                                args.case_timeout, limit)  # fmt: skip
    return r


def print_scale(r: dict[str, Any]) -> None:
    print(f"scale: private PostgreSQL, max_connections={r['max_connections']}, "
          f"{r['machine']}, {r['sleep_s'] * 1000:g} ms trials")  # fmt: skip
    for key in ("fresh", "preloaded"):
        c = r.get(key)
        if c is None:
            continue
        lat = c["ask_latency_ms"]
        conns = c["connections"]
        print(f"\n[{key}] {c['hosts']} hosts x {c['workers_per_host']} workers, "
              f"{c['trials']} trials on a study holding {c['preloaded']} finished "
              "trials")  # fmt: skip
        print(f"  exact total          {c['exact']} ({c['finished']} finished of {c['trials']}; "
              f"states {c['states']}; --n-trials {c['n_trials']})")  # fmt: skip
        print(f"  trials/s             {c['trials_per_s']} (span {c['span_s']} s, "
              f"wall {c['wall_s']} s, first trial {c.get('first_trial_s', 'n/a')} s "
              "after launch)")  # fmt: skip
        print(f"  peak connections     {c['peak_connections']} of {c['max_connections']} "
              f"(busiest host {c['peak_per_host']}) "
              f"(by state {conns['peak_by_state']}; longest idle in transaction "
              f"{conns['longest_idle_in_transaction_s']} s)")  # fmt: skip
        print(f"  ask latency ms       p50 {lat['p50']}  p95 {lat['p95']}  p99 {lat['p99']} "
              f"({lat['n']} gaps, {c['workers_seen']} workers)")  # fmt: skip
        claim = c["claim_ms"]
        print(f"  one claim ms         p50 {claim['p50']}  p95 {claim['p95']} "
              f"(alone, {claim['n']} claims after the case)")  # fmt: skip
        print(f"  per trial            {c['statements_per_trial']} statements, "
              f"{c['transactions_per_trial']} transactions")  # fmt: skip
        for s in c["top_statements"]:
            print(f"    {s['per_trial']:>7} /trial  {s['query'][:110]}")
        print(f"  host exit codes      {c['host_exit_codes']} ({c['hosts_failed']} failed)")
        print(f"  connection errors    {c['connection_error_lines']} log/stderr lines on "
              f"{c['hosts_with_connection_errors']} of {c['hosts']} hosts")  # fmt: skip
        for line in c["connection_errors"][:3]:
            print(f"    {line[:220]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="smoke mode: seconds, small sizes")
    parser.add_argument(
        "--real", action="store_true", help="real objectives (scikit-learn, PyTorch, ...) only"
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="with --real: these objectives")
    parser.add_argument(
        "--scale", action="store_true",
        help="many hosts (UTS namespaces) on one study, on a private PostgreSQL server",
    )  # fmt: skip
    parser.add_argument("--hosts", type=int, help="with --scale: hosts [12; --quick 3]")
    parser.add_argument(
        "--workers-per-host", type=int, help="with --scale: --workers of each host [3; --quick 1]"
    )
    parser.add_argument(
        "--trials", type=int, help="with --scale: trials per case [360; --quick 12]"
    )
    parser.add_argument(
        "--preload", type=int,
        help="with --scale: finished trials already in the second case's study "
        "[20000; --quick 300; 0 skips that case]",
    )  # fmt: skip
    parser.add_argument(
        "--sleep", type=float, default=0.03, help="with --scale: seconds per trial [0.03]"
    )
    parser.add_argument(
        "--max-connections", type=int, default=SCALE_MAX_CONNECTIONS,
        help=f"with --scale: the private server's max_connections [{SCALE_MAX_CONNECTIONS}]; "
        "a higher one lets code that holds more connections a host run for comparison",
    )  # fmt: skip
    parser.add_argument(
        "--case-timeout", type=float, default=600,
        help="with --scale: seconds before a case's hosts are killed [600]",
    )  # fmt: skip
    args = parser.parse_args()
    if args.scale:
        results = run_scale(args)
        if args.json:
            print(json.dumps(results, indent=2, default=str))
        else:
            print_scale(results)
        return
    results = run_real(args.quick, args.only) if args.real else run_all(args.quick)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    if args.real:
        print(f"{'objective':<20}{'plain s':>9}{'optguard s':>12}{'ratio':>7}  "
              f"{'wall: plain':>12}{'optguard':>10}{'ratio':>7}  (target ratio >= 1.0)")  # fmt: skip
        for name, row in results.items():
            if isinstance(row, dict) and "skipped" in row:
                print(f"{name:<20}{row['skipped']}")
            elif isinstance(row, dict):
                print(f"{name:<20}{row['plain_span_s']:>9}{row['optguard_span_s']:>12}"
                      f"{row['ratio']:>7}  {row['plain_wall_s']:>12}{row['optguard_wall_s']:>10}"
                      f"{row['wall_ratio']:>7}")  # fmt: skip
        return
    print(f"{'measure':<26}{'value':>12}  target")
    for name, target in TABLE:
        print(f"{name:<26}{results[name]!s:>12}  {target}")
    for runs in ("1w", "2w", "4w"):
        row = results[f"throughput_{runs}"]
        print(f"trials/s {runs:<17}optguard on SQLite {row['optguard_trials_per_s']}, plain on "
              f"SQLite {row['plain_trials_per_s']}, plain on a journal file "
              f"{row['plain_journal_trials_per_s']}")  # fmt: skip
    for backend, row in results["scaling"].items():
        print(f"scaling {backend:<18}" + "  ".join(f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
