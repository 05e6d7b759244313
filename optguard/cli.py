"""The command line: each command validates input, calls one library function, renders.

Library modules are imported inside the commands so ``optguard --help`` stays fast. Exit
codes come from the typed errors, mapped in ``main`` and nowhere else.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

if TYPE_CHECKING:
    from optguard.config import RunOptions
    from optguard.progress import Progress
    from optguard.recovery import Recovery
    from optguard.supervision import RunResult


def _help_as_written(command: Any, ctx: Any) -> None:
    """Prepare the options' help of ``command`` for display, once: flags (``--debug``,
    ``--help``, ``--keep-pools/--no-keep-pools``) get an empty metavar, so no ``<bool>``
    reads as if they took a value; and where Typer renders help with Rich, the ``[`` of the
    defaults (``[tpe]``, ``[median]``, ``[logs]``) is escaped, or Rich markup would read
    them as style tags and drop them."""
    for param in command.get_params(ctx):
        if getattr(param, "_optguard_help", False):
            continue
        param._optguard_help = True
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        help_text = getattr(param, "help", None)
        if help_text and typer.core.HAS_RICH:
            param.help = help_text.replace("[", "\\[")


class _Command(typer.core.TyperCommand):
    def format_help(self, ctx: Any, formatter: Any) -> None:
        _help_as_written(self, ctx)
        super().format_help(ctx, formatter)


class _Group(typer.core.TyperGroup):
    def format_help(self, ctx: Any, formatter: Any) -> None:
        _help_as_written(self, ctx)
        super().format_help(ctx, formatter)


app = typer.Typer(
    cls=_Group,
    name="optguard",
    help="Guarded Optuna studies: per-trial time and memory limits, cleanup, resumable runs.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}
PLAIN_PROGRESS_EVERY_S = 10.0  # a log file or pipe gets a progress line at most this often

StudyOpt = typer.Option(None, "--study", help="Study name (created or resumed).")
ObjectiveOpt = typer.Option(
    None, "--objective", help="pkg.module:function or path/file.py:function."
)
StorageOpt = typer.Option(
    None,
    "--storage",
    envvar="OPTGUARD_STORAGE",
    show_envvar=False,
    help="Optuna storage URL (sqlite, postgresql, mysql) or journal:///path.log (Optuna's "
    "journal file). Default: sqlite file optguard.db.",
)
NTrialsOpt = typer.Option(None, "--n-trials", help="Total trials of the study, all workers.")
TimeoutOpt = typer.Option(None, "--timeout", help="Per-trial wall clock: 90s, 30m, 1.5h. [30m]")
MaxRssOpt = typer.Option(None, "--max-rss", help="Per-trial memory: 512MB, 12GB, 12GiB. [12GB]")
DirectionOpt = typer.Option(
    None, "--direction", metavar="DIRECTION", help="minimize or maximize; repeat it (or use "
    "--directions) for a multi-objective study. [an existing study's own; minimize]",
)
DirectionsOpt = typer.Option(
    None, "--directions", help="Comma list, one per objective: minimize,maximize."
)
SeedOpt = typer.Option(
    None, "--seed", help="Seed each worker's sampler reproducibly (a different seed per worker "
    "and per restart, derived from this one).",
)
SamplerOpt = typer.Option(None, "--sampler", help="tpe, random, cmaes, qmc, gp, nsga2. [tpe]")
PrunerOpt = typer.Option(
    None, "--pruner", help="median, none, halving, hyperband, wilcoxon[:P] (per-fold reports: "
    "step = fold id), patient:N[:PRUNER] (Optuna's PatientPruner around PRUNER, median if "
    "none given). [median]",
)
ConfigOpt = typer.Option(None, "--config", help="TOML file with any of these options.")
LogDirOpt = typer.Option(None, "--log-dir", help="Directory of the worker logs. [logs]")
MaxTrialsPerWorkerOpt = typer.Option(
    None, "--max-trials-per-worker", help="Replace a worker after this many trials."
)
TagOpt = typer.Option(None, "--tag", help="Stored on every new trial (e.g. a git commit).")
RecycleRssOpt = typer.Option(
    None, "--recycle-rss", help="Replace a worker whose memory after cleanup is above this."
)
CheckpointDirOpt = typer.Option(
    None, "--checkpoint-dir", help="Root of optguard.checkpoints(trial) directories. [checkpoints]"
)
CheckpointBudgetOpt = typer.Option(
    None, "--checkpoint-budget", help="Time the on_interrupt callbacks of an interrupted trial "
    "get before the worker may be killed. [10s]",
)
CheckpointStoreOpt = typer.Option(
    None, "--checkpoint-store", help="Where optguard.checkpoints(trial) keeps checkpoints: "
    "local (--checkpoint-dir) or artifacts (the artifact store, so that a retry on any host "
    "resumes). [local]",
)
ArtifactsOpt = typer.Option(
    None, "--artifacts", help="Artifact store directory for the guard's evidence (memory "
    "timeline, log lines) shown in optuna-dashboard, or none. [optguard-artifacts beside the "
    "storage file]",
)
ArtifactsAllOpt = typer.Option(
    None, "--artifacts-all/--artifacts-guarded", help="Evidence for every trial, or only for "
    "those the guard ended. [guarded]",
)

KeepPoolsOpt = typer.Option(
    None, "--keep-pools/--no-keep-pools", help="Keep the idle workers of a process pool the "
    "worker still holds (joblib n_jobs, multiprocessing.Pool, persistent DataLoader) for the "
    "next trials; --no-keep-pools ends every process a trial started and left running. [keep]",
)
MaxVramOpt = typer.Option(
    None, "--max-vram", help="Per-trial GPU memory of the worker's processes (NVML; torch's "
    "counters inside the worker without it): 8GB, or 90% of its GPUs' memory. [none]",
)
StorageOutageOpt = typer.Option(
    None, "--storage-outage", help="Ride out a storage outage this long (retries with "
    "backoff), then exit 3 with the driver's cause. [60s]",
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logging."),
) -> None:
    _state["debug"] = debug
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s %(message)s")


def _options(**flags: Any) -> "RunOptions":
    from optguard.config import resolve_options

    config = flags.pop("config")
    ignore = flags.pop("ignore", ())
    return resolve_options(flags, config, ignore)


class _Renderer:
    """A Rich progress bar on a terminal; plain lines when the output is a file or pipe."""

    def __init__(self, n_trials: Optional[int], study: str) -> None:
        from rich.console import Console

        self.console = Console(stderr=False)
        self.n_trials = n_trials
        self.study = study
        self.last_line = ""
        self.printed_at = -PLAIN_PROGRESS_EVERY_S
        self.bar: Any = None
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
            from rich.progress import TimeElapsedColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
            )
            self.task = self.bar.add_task(study, total=n_trials, info="")
            self.bar.start()

    def __call__(self, progress: "Progress") -> None:
        if self.bar is not None:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(progress.prune_reasons.items()))
            info = f"{progress.best_text()}  running {progress.running}"
            info += f"  pruned {progress.states.get('PRUNED', 0)}" + (f" ({reasons})" if reasons else "")
            self.bar.update(self.task, completed=progress.finished, info=info)
            return
        line = progress.describe(self.n_trials)
        now = time.monotonic()
        if line != self.last_line and now - self.printed_at >= PLAIN_PROGRESS_EVERY_S:
            self.last_line, self.printed_at = line, now
            print(f"[{self.study}] {line}", flush=True)

    def notice(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(f"optguard: {text}")
        else:
            print(f"optguard: {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@app.command(cls=_Command)
def run(
    study: Optional[str] = StudyOpt,
    objective: Optional[str] = ObjectiveOpt,
    workers: Optional[int] = typer.Option(None, "--workers", help="Worker processes. [1]"),
    n_trials: Optional[int] = NTrialsOpt,
    storage: Optional[str] = StorageOpt,
    timeout: Optional[str] = TimeoutOpt,
    max_rss: Optional[str] = MaxRssOpt,
    direction: Optional[list[str]] = DirectionOpt,
    directions: Optional[str] = DirectionsOpt,
    sampler: Optional[str] = SamplerOpt,
    pruner: Optional[str] = PrunerOpt,
    seed: Optional[int] = SeedOpt,
    config: Optional[Path] = ConfigOpt,
    log_dir: Optional[Path] = LogDirOpt,
    grace: Optional[str] = typer.Option(
        None, "--grace", help="Past the time limit, wait this long for a check before "
        "interrupting the trial. [60s]",
    ),
    memory_grace: Optional[str] = typer.Option(
        None, "--memory-grace", help="Past the memory limit, the same wait; 0 interrupts at once. [0s]"
    ),
    kill_after: Optional[str] = typer.Option(
        None, "--kill-after", help="After an interrupt the worker acknowledged, wait this "
        "long before SIGTERM to its process tree, and as long again before SIGKILL. [5s]",
    ),
    memory_ceiling: Optional[float] = typer.Option(
        None, "--memory-ceiling", help="Kill at once above this multiple of --max-rss. [1.25]"
    ),
    max_system_ram: Optional[str] = typer.Option(
        None, "--max-system-ram", help="Prune the biggest trial when used RAM passes this "
        "percent. [90]",
    ),
    max_trials_per_worker: Optional[int] = MaxTrialsPerWorkerOpt,
    recycle_rss: Optional[str] = RecycleRssOpt,
    tag: Optional[str] = TagOpt,
    patience: Optional[int] = typer.Option(
        None, "--patience", help="End the study when the best value has not improved over "
        "the last N finished trials.",
    ),
    min_delta: Optional[float] = typer.Option(
        None, "--min-delta", help="Improvement that counts for --patience. [0]"
    ),
    terminate: Optional[bool] = typer.Option(
        None, "--terminate/--no-terminate", help="End the study on every host when Optuna's "
        "terminator says the regret bound fell below the statistical error (the objective "
        "reports cross-validation scores). [off]",
    ),
    heartbeat: Optional[str] = typer.Option(
        None, "--heartbeat", help="Interval of the RDB heartbeat of running trials; a trial "
        "whose host stops beating for 4 intervals is reaped by another host. [30s]",
    ),
    retry_pruned: Optional[str] = typer.Option(
        None, "--retry-pruned", help="Enqueue once the params of trials optguard ended for "
        "these reasons: timeout,memory,system_memory,worker_died,gpu_memory.",
    ),
    checkpoint_dir: Optional[Path] = CheckpointDirOpt,
    checkpoint_budget: Optional[str] = CheckpointBudgetOpt,
    checkpoint_store: Optional[str] = CheckpointStoreOpt,
    artifacts: Optional[str] = ArtifactsOpt,
    artifacts_all: Optional[bool] = ArtifactsAllOpt,
    start_timeout: Optional[str] = typer.Option(
        None, "--start-timeout", help="A worker not ready by then (its objective's import "
        "hangs) ends the run. [10m]",
    ),
    fail_fast: Optional[int] = typer.Option(
        None, "--fail-fast", help="End the run when its first N trials all fail with the same "
        "error, as study.optimize stops at the first; 0 tolerates failures. [3]",
    ),
    storage_outage: Optional[str] = StorageOutageOpt,
    threads_per_worker: Optional[int] = typer.Option(
        None, "--threads-per-worker", help="OMP/MKL/OpenBLAS/... threads of each worker, "
        "unless already set in the environment. [cores available / --workers]",
    ),
    cpu_affinity: Optional[bool] = typer.Option(
        None, "--cpu-affinity/--no-cpu-affinity", help="Pin each worker to its own "
        "--threads-per-worker cores (a replacement gets the same ones). [off]",
    ),
    keep_pools: Optional[bool] = KeepPoolsOpt,
    gateway: Optional[bool] = typer.Option(
        None, "--gateway/--no-gateway", help="On PostgreSQL or MySQL, the workers' storage "
        "calls go through the supervisor: 2 database connections per host whatever --workers "
        "is. --no-gateway gives each worker its own 2 (faster for trials of milliseconds). "
        "[gateway]",
    ),
    gpus: Optional[str] = typer.Option(
        None, "--gpus", help="GPUs to share out among the workers, as CUDA_VISIBLE_DEVICES: "
        "0,1,2,3 or all (--workers then defaults to the number of groups). [none]",
    ),
    gpus_per_worker: Optional[int] = typer.Option(
        None, "--gpus-per-worker", help="GPUs in each worker's group; a replacement gets the "
        "group of the worker it replaces. [1]",
    ),
    max_vram: Optional[str] = MaxVramOpt,
) -> None:
    """Run a guarded study with N worker processes on one shared storage."""
    opts = _options(
        study=study, objective=objective, workers=workers, n_trials=n_trials, storage=storage,
        timeout=timeout, max_rss=max_rss, direction=direction or None, directions=directions,
        sampler=sampler, pruner=pruner, seed=seed, config=config, log_dir=log_dir, grace=grace,
        memory_grace=memory_grace,
        kill_after=kill_after, memory_ceiling=memory_ceiling, max_system_ram=max_system_ram,
        max_trials_per_worker=max_trials_per_worker, recycle_rss=recycle_rss, tag=tag,
        retry_pruned=retry_pruned, patience=patience, min_delta=min_delta, heartbeat=heartbeat,
        terminate=terminate,
        checkpoint_dir=checkpoint_dir, checkpoint_budget=checkpoint_budget,
        checkpoint_store=checkpoint_store, artifacts=artifacts, artifacts_all=artifacts_all,
        start_timeout=start_timeout, fail_fast=fail_fast, storage_outage=storage_outage,
        threads_per_worker=threads_per_worker, cpu_affinity=cpu_affinity, keep_pools=keep_pools,
        gateway=gateway, gpus=gpus, gpus_per_worker=gpus_per_worker, max_vram=max_vram,
    )  # fmt: skip
    import os

    from optguard.gpus import describe_groups, run_groups
    from optguard.storage import mask_url, resolve_url
    from optguard.supervision import run_study
    from optguard.threads import plan_threads, run_cpus

    threads = plan_threads(
        opts.threads_per_worker, opts.workers, opts.cpu_affinity, os.environ, run_cpus()
    )
    groups = run_groups(opts.gpus, opts.gpus_per_worker)
    gpu_text = f"{describe_groups(groups, opts.workers)}, " if groups else ""
    print(
        f"optguard: study {opts.study!r} on {mask_url(resolve_url(opts.storage))}, "
        f"{opts.workers} worker(s), {threads.describe()}, {gpu_text}logs in {opts.log_dir}/",
        flush=True,
    )
    renderer = _Renderer(opts.n_trials, opts.study)
    try:
        result = run_study(
            opts, on_progress=renderer, on_recovery=_recovered, on_notice=renderer.notice
        )
    finally:
        renderer.close()
    _summary(result)


def _recovered(recovery: "Recovery") -> None:
    def numbers(items: list[int]) -> str:
        return ", ".join(f"#{n}" for n in items)

    if recovery.cleared:
        print(f"optguard: cleared the pending '{recovery.cleared}' request; continuing", flush=True)
    if recovery.reaped:
        print(
            f"optguard: {len(recovery.reaped)} trial(s) left RUNNING by a run that died marked "
            f"FAIL (interrupted): {numbers(recovery.reaped)}",
            flush=True,
        )
    if recovery.retried:
        print(
            f"optguard: enqueued once more the params of {numbers(recovery.retried)}", flush=True
        )


def _summary(result: "RunResult") -> None:
    from optguard.errors import EXIT_INTERRUPTED

    print(
        f"optguard: {result.progress.describe(result.n_trials)}; "
        f"{result.seconds:.1f}s, {result.interrupts} interrupt(s), {result.hard_kills} hard "
        f"kill(s), {result.worker_deaths} worker death(s)",
        flush=True,
    )
    if result.ended_by is not None:
        print(f"optguard: study ended on purpose: {result.ended_by}", flush=True)
    if result.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)


@app.command(cls=_Command)
def worker(
    study: Optional[str] = StudyOpt,
    objective: Optional[str] = ObjectiveOpt,
    n_trials: Optional[int] = NTrialsOpt,
    storage: Optional[str] = StorageOpt,
    timeout: Optional[str] = TimeoutOpt,
    max_rss: Optional[str] = MaxRssOpt,
    direction: Optional[list[str]] = DirectionOpt,
    directions: Optional[str] = DirectionsOpt,
    sampler: Optional[str] = SamplerOpt,
    pruner: Optional[str] = PrunerOpt,
    seed: Optional[int] = SeedOpt,
    config: Optional[Path] = ConfigOpt,
    log_dir: Optional[Path] = LogDirOpt,
    index: int = typer.Option(0, "--index", min=0, help="Worker number in the log file name."),
    max_trials_per_worker: Optional[int] = MaxTrialsPerWorkerOpt,
    recycle_rss: Optional[str] = RecycleRssOpt,
    tag: Optional[str] = TagOpt,
    checkpoint_dir: Optional[Path] = CheckpointDirOpt,
    checkpoint_budget: Optional[str] = CheckpointBudgetOpt,
    checkpoint_store: Optional[str] = CheckpointStoreOpt,
    artifacts: Optional[str] = ArtifactsOpt,
    artifacts_all: Optional[bool] = ArtifactsAllOpt,
    storage_outage: Optional[str] = StorageOutageOpt,
    keep_pools: Optional[bool] = KeepPoolsOpt,
    max_vram: Optional[str] = MaxVramOpt,
) -> None:
    """Run one worker in this process (what `run` starts N times; start more on other hosts)."""
    from optguard.config import RUN_ONLY_KEYS, load_config

    ignored = [k for k in RUN_ONLY_KEYS if k in load_config(config)] if config else []
    if ignored:  # a worker's GPUs are its CUDA_VISIBLE_DEVICES: `run` shares them out
        print(
            f"optguard: warning: {', '.join(ignored)} (in {config}) applies to `optguard run` "
            "only: the worker ignores it (give it its GPUs with CUDA_VISIBLE_DEVICES)",
            file=sys.stderr, flush=True,
        )  # fmt: skip
    opts = _options(
        study=study, objective=objective, n_trials=n_trials, storage=storage, timeout=timeout,
        max_rss=max_rss, direction=direction or None, directions=directions, sampler=sampler,
        pruner=pruner, seed=seed, config=config, log_dir=log_dir, workers=None,
        max_trials_per_worker=max_trials_per_worker, recycle_rss=recycle_rss, tag=tag, checkpoint_dir=checkpoint_dir,
        checkpoint_budget=checkpoint_budget, storage_outage=storage_outage,
        keep_pools=keep_pools, checkpoint_store=checkpoint_store, artifacts=artifacts,
        artifacts_all=artifacts_all, max_vram=max_vram, ignore=ignored,
    )  # fmt: skip
    from optguard.worker import run_worker

    code = run_worker(opts, index)
    if code:
        raise typer.Exit(code)


def _request(study: str, storage: Optional[str], action: str) -> None:
    from optguard.control import request

    where = request(study, storage, action)
    print(f"optguard: {action} requested for study {study!r} on {where}")


@app.command(cls=_Command)
def stop(
    study: str = typer.Option(..., "--study", help="Study to stop."),
    storage: Optional[str] = StorageOpt,
) -> None:
    """Graceful: workers on every host take no new trial; running trials finish."""
    _request(study, storage, "stop")


@app.command(cls=_Command)
def cancel(
    study: str = typer.Option(..., "--study", help="Study to cancel."),
    storage: Optional[str] = StorageOpt,
) -> None:
    """Immediate: running trials are pruned at their next check (killed if they never reach
    one); workers exit."""
    _request(study, storage, "cancel")


@app.command(cls=_Command)
def report(
    study: str = typer.Option(..., "--study", help="Study to report on."),
    storage: Optional[str] = StorageOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one stable JSON document."),
    plot: Optional[Path] = typer.Option(
        None, "--plot", help="Write memory and duration per trial to FILE.png or FILE.html."
    ),
    html: Optional[Path] = typer.Option(
        None, "--html", help="Write the whole report as one self-contained page to FILE."
    ),
) -> None:
    """What happened in a study: states, guard prunes, retries, leaks, patterns, limits."""
    import json

    from optguard.report import build_report, write_plot
    from optguard.report_html import write_html

    data = build_report(study, storage)
    if plot is not None:
        write_plot(data, plot)
    if html is not None:
        write_html(data, html)
    if as_json:
        print(json.dumps(_strict_json(data), indent=2, sort_keys=True, allow_nan=False))
        return
    _render_report(data)
    if plot is not None:
        print(f"plot written to {plot}")
    if html is not None:
        print(f"report page written to {html}")


def _strict_json(value: Any) -> Any:
    """``value`` with every infinite or NaN float as the string ``"inf"``, ``"-inf"`` or
    ``"nan"``: JSON has no such numbers, and strict parsers (jq) refuse Python's
    ``Infinity``, which an objective value or a Pareto point can be."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def _reason_label(reason: str, out_of_memory: int) -> str:
    """``memory (2 ran out of memory)``: an objective's out-of-memory error crossed no
    limit, and the table must not read as if it had."""
    return f"{reason} ({out_of_memory} ran out of memory)" if out_of_memory else reason


def _render_report(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(soft_wrap=True)  # long lines stay whole for grep and pipes
    best = data["best"]
    if len(data["directions"]) > 1:
        front = data["best_trials"]
        best_text = f"Pareto front of {len(front)} trial(s) ({', '.join(data['directions'])})"
    else:
        best_text = "best " + ("-" if best is None else f"{best['value']:.6g} (#{best['trial']})")
    console.print(
        f"[bold]{escape(data['study'])}[/] on {escape(data['storage'])}: {data['trials']} "
        f"trials, {best_text}"
    )
    if len(data["directions"]) > 1:
        for row in data["best_trials"]:
            values = ", ".join(f"{v:.6g}" for v in row["values"])
            console.print(escape(f"  #{row['trial']}: [{values}]"))  # "[inf, 5]" is no tag

    def counts(title: str, values: dict[str, Any]) -> None:
        table = Table(title=title, title_justify="left")
        table.add_column("")
        table.add_column("trials", justify="right")
        for key, value in values.items():
            table.add_row(str(key), str(value))
        console.print(table)

    counts("States", data["states"])
    oom = data.get("out_of_memory", {})
    counts("Ended by optguard", {
        **{_reason_label(r, oom.get(r, 0)): n for r, n in data["guard_prunes"].items()},
        "hard kills": data["hard_kills"],
    })  # fmt: skip
    retries = data["retries"]
    outcomes = f" ({_state_words(retries['outcomes'])})" if retries["outcomes"] else ""
    console.print(f"Retries: {retries['count']}{outcomes}", markup=False, highlight=False)
    tags = "; ".join(f"{t}: {_state_words(c)}" for t, c in data["tags"].items())
    console.print(f"Per tag: {tags or 'no trials'}", markup=False, highlight=False)
    for worker, trend in data["memory_trend"].items():
        flag = " [red]LEAK: cleanup is not reclaiming[/]" if trend["leak"] else ""
        console.print(
            f"Memory {worker}: final {trend['final_mb'][0]} -> {trend['final_mb'][-1]} MB over "
            f"{len(trend['trials'])} trials, {trend['growth_mb_per_trial']:+.2f} MB/trial{flag}"
        )
    if any(trend["leak"] for trend in data["memory_trend"].values()):
        console.print(f"Leak rule: {data['leak_rule']}", markup=False, highlight=False)
    for pattern in data["patterns"]:
        console.print(f"Pattern: {pattern['text']}", markup=False, highlight=False)
    console.print(
        f"Patterns: {'' if data['patterns'] else 'none found; '}rule: {data['pattern_rule']}",
        markup=False, highlight=False,
    )  # fmt: skip
    console.print(
        "Slowest: " + ", ".join(f"#{r['trial']} {r['duration_s']:.1f}s" for r in data["slowest"])
    )
    for kind, rows in data["closest_to_limits"].items():
        close = [r for r in rows if r["fraction"] >= CLOSE_FRACTION]
        if close:
            console.print(
                f"Closest to the {kind} limit: "
                + ", ".join(f"#{r['trial']} {r['fraction']:.0%}" for r in close)
            )
        elif rows:
            console.print(
                f"Closest to the {kind} limit: none, no trial used {CLOSE_FRACTION:.0%} of it"
            )


STATE_ORDER = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
CLOSE_FRACTION = 0.01  # below this share of a limit, a trial is not "close" to it


def _state_words(counts: dict[str, int]) -> str:
    """``13 complete, 2 pruned``: trial counts per state in words, in a fixed order."""
    order = {state: i for i, state in enumerate(STATE_ORDER)}
    ranked = sorted(counts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
    words = {"FAIL": "failed"}
    return ", ".join(f"{n} {words.get(s, s.lower())}" for s, n in ranked if n) or "none"


@app.command(cls=_Command)
def monitor(
    interval: Optional[str] = typer.Option(None, "--interval", help="Between samples. [30s]"),
    log: Optional[Path] = typer.Option(
        None, "--log", help="JSONL file each sample is appended to (default logs/memory_HOST.jsonl)."
    ),
    no_log: bool = typer.Option(False, "--no-log", help="Write no log."),
    study: Optional[str] = typer.Option(
        None, "--study", help="Also show the trial each worker of this host runs."
    ),
    storage: Optional[str] = StorageOpt,
    warn_ram: str = typer.Option("85", "--warn-ram", help="Warn once when RAM reaches this %."),
    warn_gpu: str = typer.Option("90", "--warn-gpu", help="Warn once when a GPU reaches this %."),
    warn_swap: str = typer.Option("50", "--warn-swap", help="Warn once when swap reaches this %."),
    samples: Optional[int] = typer.Option(None, "--samples", min=1, help="Stop after N samples."),
    analyze: Optional[Path] = typer.Option(
        None, "--analyze", help="Summarise a monitor log instead of sampling."
    ),
    as_json: bool = typer.Option(False, "--json", help="With --analyze: one JSON document."),
    plot: Optional[Path] = typer.Option(
        None, "--plot", help="With --analyze: RAM, swap and GPU % over time to FILE.png."
    ),
) -> None:
    """Sample RAM, swap, GPU memory and this host's workers until Ctrl+C; or --analyze a log."""
    from optguard.errors import UsageError
    from optguard.limits import parse_duration, parse_percent
    from optguard.monitor import MonitorOptions, Thresholds, default_log_path

    thresholds = Thresholds(
        ram=parse_percent(warn_ram, "--warn-ram"),
        gpu=parse_percent(warn_gpu, "--warn-gpu"),
        swap=parse_percent(warn_swap, "--warn-swap"),
    )
    if analyze is not None:
        if log is not None or no_log or study is not None or samples is not None or interval:
            raise UsageError("--analyze reads a log: it takes no --log, --no-log, --study, "
                             "--samples or --interval")  # fmt: skip
        _analyze(analyze, thresholds, as_json, plot)
        return
    if as_json or plot is not None:
        raise UsageError("--json and --plot go with --analyze FILE")
    if log is not None and no_log:
        raise UsageError("--log and --no-log cannot be used together")
    opts = MonitorOptions(
        interval_s=parse_duration(interval or "30s", "--interval"),
        log_path=None if no_log else (log or default_log_path()), thresholds=thresholds,
        study=study, storage=storage, max_samples=samples,
    )  # fmt: skip
    from optguard.monitor import run_monitor
    from optguard.monitor_view import MonitorView

    where = "no log" if opts.log_path is None else f"log {opts.log_path}"
    if study is not None:
        from optguard.storage import mask_url, resolve_url

        where += f", study {study!r} on {mask_url(resolve_url(storage))}"
    print(f"optguard: monitoring every {opts.interval_s:g}s, {where}; Ctrl+C ends", flush=True)
    view = MonitorView()
    try:
        result = run_monitor(opts, on_sample=view, on_notice=lambda t: view.print(f"optguard: {t}"))
    finally:
        view.close()
    done = "taken (no log)" if result.log_path is None else f"written to {result.log_path}"
    print(f"optguard: {result.samples} samples {done}, {result.warnings} warning(s)", flush=True)


def _analyze(path: Path, thresholds: Any, as_json: bool, plot: Optional[Path]) -> None:
    import json

    from optguard.monitor_analysis import analyze_log, write_monitor_plot
    from optguard.monitor_view import render_analysis

    summary = analyze_log(path, thresholds)
    if plot is not None:
        write_monitor_plot(summary, plot)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    render_analysis(summary)
    if plot is not None:
        print(f"plot written to {plot}")


checkpoints_app = typer.Typer(
    cls=_Group, name="checkpoints", help="Trial checkpoints (optguard.checkpoints).",
    no_args_is_help=True,
)
app.add_typer(checkpoints_app)


@checkpoints_app.command("prune", cls=_Command)
def checkpoints_prune(
    study: str = typer.Option(..., "--study", help="Study whose checkpoints to prune."),
    storage: Optional[str] = StorageOpt,
    keep_best: int = typer.Option(
        1, "--keep-best", help="Keep those of the best K COMPLETE trials."
    ),
    checkpoint_dir: Optional[Path] = CheckpointDirOpt,
) -> None:
    """Delete finished trials' checkpoints but the best K (never a running or queued trial's)."""
    from optguard.checkpointing import prune_checkpoints

    result = prune_checkpoints(study, storage, keep_best, checkpoint_dir)

    def numbers(items: list[int]) -> str:
        return ", ".join(f"#{n}" for n in items) or "none"

    print(
        f"optguard: freed {result.freed_bytes / 1e6:.1f} MB in {result.directory}/: removed "
        f"trial(s) {numbers(result.removed)}; kept best {numbers(result.kept_best)}"
        + (f"; left running/queued {numbers(result.busy)}" if result.busy else ""),
        flush=True,
    )


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: every error becomes one line on stderr and its documented exit code."""
    from optguard.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, OptguardError

    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="optguard", standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(code) comes back as a return value
            sys.exit(code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # click's usage errors, as vendored by typer
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"optguard: error: {message}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", EXIT_USAGE))
    except (typer.Abort, KeyboardInterrupt):
        print("optguard: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except OptguardError as exc:
        if _state["debug"]:
            traceback.print_exc()
        try:
            print(f"optguard: error: {exc}", file=sys.stderr, flush=True)
        except OSError:
            pass  # stderr on the full disk that caused the error: the exit code still says it
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug of ours: still one line unless --debug
        if _state["debug"]:
            traceback.print_exc()
        print(f"optguard: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
