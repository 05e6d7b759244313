"""Multi-objective studies, constraints and --seed: decisions as tables, then real runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from conftest import load_trials, log_text, objective, one_error_line, run_cli, sqlite_url
from optuna.trial import TrialState

from optguard.config import resolve_options
from optguard.early_stopping import patience_error
from optguard.errors import UsageError
from optguard.progress import Progress, pareto_front_size
from optguard.study import (
    SAMPLERS,
    SINGLE_OBJECTIVE_SAMPLERS,
    make_sampler,
    parse_directions,
    resolve_directions,
    sampler_error,
    worker_seed,
)
from optguard.supervision.workers import worker_argv
from optguard.worker import _as_value

MULTI = objective("multi.py:objective")
FAST = objective("fast.py:objective")
BASE = {"study": "s", "objective": "m:f"}


# -- decisions -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("result", "n", "value", "error"),
    [
        ((1, 2), 2, [1.0, 2.0], None),
        (np.array([1.5, -2.0]), 2, [1.5, -2.0], None),
        ([1.0, float("inf")], 2, [1.0, math.inf], None),
        ([1.0, float("nan")], 2, None, "objective returned NaN for objective 2 of 2"),
        ([1.0, 2.0, 3.0], 2, None, "objective returned 3 value(s) for a study with 2 objectives"),
        ([1.0], 2, None, "objective returned 1 value(s) for a study with 2 objectives"),
        (3.0, 2, None, ("objective returned float for a study with 2 objectives: return a "
                        "sequence of 2 numbers")),
        ("ab", 2, None, ("objective returned str for a study with 2 objectives: return a "
                         "sequence of 2 numbers")),
        ([1.0, "x"], 2, None, "objective returned a non-number: str 'x' for objective 2 of 2"),
        (np.array(3.0), 2, None, "objective returned a 0-d array for a study with 2 objectives"),
        (0.5, 1, 0.5, None),
        (float("nan"), 1, None, "objective returned NaN"),
    ],
)  # fmt: skip
def test_as_value(result: Any, n: int, value: Any, error: str | None) -> None:
    assert _as_value(result, n) == (value, error)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["minimize"], ("minimize",)),
        (["minimize", "MAXIMIZE"], ("minimize", "maximize")),
        (["minimize,maximize"], ("minimize", "maximize")),
        ([], ()),
    ],
)
def test_parse_directions(values: list[str], expected: tuple[str, ...]) -> None:
    assert parse_directions(values, "--direction") == expected


def test_parse_directions_refuses_unknown() -> None:
    with pytest.raises(UsageError, match="--directions must be one of minimize, maximize, got 'up'"):
        parse_directions(["minimize,up"], "--directions")


@pytest.mark.parametrize(
    ("given", "stored", "expected"),
    [
        ((), None, ("minimize",)),  # a new study, nothing given
        (("maximize", "minimize"), None, ("maximize", "minimize")),
        ((), ("minimize", "maximize"), ("minimize", "maximize")),  # picked up from the study
        (("minimize", "maximize"), ("minimize", "maximize"), ("minimize", "maximize")),
        (("minimize",), ("minimize", "maximize"), UsageError),
        (("maximize", "minimize"), ("minimize", "maximize"), UsageError),
    ],
)
def test_resolve_directions(given: tuple[str, ...], stored: Any, expected: Any) -> None:
    if expected is UsageError:
        with pytest.raises(UsageError, match="study 's' exists with direction minimize,maximize"):
            resolve_directions(given, stored, "s")
    else:
        assert resolve_directions(given, stored, "s") == expected


def test_worker_seed_differs_by_worker_and_restart_not_by_run() -> None:
    seeds = {worker_seed(7, i, n) for i in range(3) for n in (0, 1, 10)}
    assert len(seeds) == 9
    assert worker_seed(7, 0, 0) == worker_seed(7, 0, 0) != worker_seed(8, 0, 0)
    assert all(0 <= s < 2**32 for s in seeds)
    # What the README promises, and no more: only the (index, trial count) pair tells workers
    # apart; a replacement started at its predecessor's count gets its seed.
    assert worker_seed(7, 2, 5) == worker_seed(7, 2, 5) != worker_seed(7, 2, 6)


@pytest.mark.parametrize(
    ("sampler", "n", "refused"),
    [
        ("cmaes", 2, True),
        ("cmaes", 3, True),
        ("cmaes", 1, False),
        ("cmaes", 0, False),  # not known yet: an existing study's are checked once open
        ("tpe", 2, False),
        ("random", 2, False),
        ("qmc", 2, False),
        ("gp", 2, False),
        ("nsga2", 2, False),
        ("nsga2", 1, False),
    ],
)
def test_sampler_error(sampler: str, n: int, refused: bool) -> None:
    error = sampler_error(sampler, n)
    assert (error is not None) == refused
    if refused:
        assert error == (
            f"--sampler {sampler} needs a single-objective study: this one has {n} objectives "
            "(use tpe, nsga2, gp, qmc or random)"
        )


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # qmc
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_single_objective_samplers_are_those_optuna_refuses(sampler: str) -> None:
    """Checked against Optuna itself: a sampler listed as single-objective fails a
    multi-objective trial; the others sample it (cmaes refuses before importing cmaes)."""
    for package in {"gp": ("torch", "scipy"), "qmc": ("scipy",)}.get(sampler, ()):
        pytest.importorskip(package)
    study = optuna.create_study(directions=["minimize", "maximize"],
                                sampler=make_sampler(sampler, seed=1))  # fmt: skip
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)),
                   n_trials=3, catch=(ValueError,))  # fmt: skip
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert bool(failed) == (sampler in SINGLE_OBJECTIVE_SAMPLERS)


@pytest.mark.parametrize(
    ("points", "maximize", "size"),
    [
        ([], [False, False], 0),
        ([[1, 2], [2, 1], [2, 2]], [False, False], 2),
        ([[1, 2], [1, 2], [3, 3]], [False, False], 2),  # equal points are both on the front
        ([[1, 2], [2, 1], [2, 2]], [True, True], 1),
        ([[1, 2], [2, 3], [2, 1]], [False, True], 2),  # minimize x, maximize y
        ([[0, 0, 1], [0, 1, 0], [1, 0, 0], [1, 1, 1]], [False] * 3, 3),
        ([[math.inf, 0], [0, math.inf], [1, 1]], [False, False], 3),
    ],
)
def test_pareto_front_size(points: list[list[float]], maximize: list[bool], size: int) -> None:
    assert pareto_front_size(points, maximize) == size


@pytest.mark.parametrize(
    ("patience", "n", "refused"), [(None, 2, False), (3, 1, False), (3, 2, True)]
)
def test_patience_error(patience: int | None, n: int, refused: bool) -> None:
    assert (patience_error(patience, n) is not None) == refused


def test_progress_text_shows_the_front_instead_of_a_best_value() -> None:
    multi = Progress(states={"COMPLETE": 4}, n_objectives=2, pareto_front=3)
    assert "pareto_front=3" in multi.describe(10) and "best" not in multi.describe(10)
    assert multi.best_text() == "pareto front 3"
    single = Progress(states={"COMPLETE": 4}, best_value=0.25)
    assert "best=0.25" in single.describe(10) and single.best_text() == "best 0.25"


def test_options_and_worker_argv(tmp_path: Path) -> None:
    opts = resolve_options({**BASE, "direction": ["minimize", "maximize"], "seed": 3})
    assert opts.directions == ("minimize", "maximize") and opts.seed == 3
    argv = worker_argv(opts, 1)
    assert argv[argv.index("--seed") + 1] == "3"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--direction"] == [
        "minimize", "maximize"
    ]  # fmt: skip
    assert "--direction" not in worker_argv(resolve_options(BASE), 0)  # the study's own
    assert resolve_options({**BASE, "directions": "maximize,minimize"}).directions == (
        "maximize", "minimize"
    )  # fmt: skip
    cfg = tmp_path / "c.toml"
    cfg.write_text('directions = ["minimize", "maximize"]\nseed = 5\n')
    from_file = resolve_options(BASE, cfg)
    assert from_file.directions == ("minimize", "maximize") and from_file.seed == 5
    assert resolve_options({**BASE, "direction": ["maximize"]}, cfg).directions == ("maximize",)
    with pytest.raises(UsageError, match="--direction and --directions: give only one"):
        resolve_options({**BASE, "direction": ["minimize"], "directions": "minimize"})
    with pytest.raises(UsageError, match="--patience needs a single-objective study"):
        resolve_options({**BASE, "directions": "minimize,maximize", "patience": 3})
    with pytest.raises(UsageError, match="--seed must be >= 0"):
        resolve_options({**BASE, "seed": -1})
    with pytest.raises(UsageError, match="^--sampler cmaes needs a single-objective study: "
                                         "this one has 2 objectives"):
        resolve_options({**BASE, "directions": "minimize,maximize", "sampler": "cmaes"})
    cfg.write_text('directions = ["minimize", "maximize"]\nsampler = "cmaes"\n')
    with pytest.raises(UsageError, match=r"^sampler \(in .*c.toml\) cmaes needs a single"):
        resolve_options(BASE, cfg)
    assert resolve_options({**BASE, "directions": "minimize"}, cfg).sampler == "cmaes"
    assert resolve_options({**BASE, "sampler": "cmaes"}).sampler == "cmaes"  # the study's


# -- real runs -------------------------------------------------------------------------------
def _run(cwd: Path, study: str, target: str, *extra: str) -> Any:
    return run_cli("run", "--study", study, "--objective", target, *extra, cwd=cwd)


@pytest.mark.scenario
def test_two_objectives_nsga2_then_tpe_with_guard_prune_and_report(
    tmp_path: Path, study_name: str
) -> None:
    """Optuna's example shape under 2 workers: NSGA-II creates the study (one trial pruned by
    the time limit, three failing on bad results), TPE resumes it without --direction, past
    its 10 random startup trials (a pruned trial among them)."""
    url = sqlite_url(tmp_path)
    limits = ("--timeout", "1", "--grace", "1", "--kill-after", "1", "--fail-fast", "0")
    result = _run(
        tmp_path, study_name, MULTI, "--directions", "minimize,minimize", "--sampler", "nsga2",
        "--workers", "2", "--n-trials", "10", *limits,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "pareto_front=" in result.stdout and "best=" not in result.stdout
    study = optuna.load_study(study_name=study_name, storage=url)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert trials[2].state == TrialState.PRUNED
    assert trials[2].user_attrs["optguard.reason"] == "timeout"
    errors = {n: trials[n].user_attrs.get("optguard.error") for n in (5, 6, 7)}
    assert errors == {
        5: "objective returned NaN for objective 2 of 2",
        6: "objective returned 3 value(s) for a study with 2 objectives",
        7: "objective returned float for a study with 2 objectives: return a sequence of 2 "
           "numbers",
    }  # fmt: skip
    assert all(trials[n].state == TrialState.FAIL for n in (5, 6, 7))
    complete = [t for t in trials.values() if t.state == TrialState.COMPLETE]
    assert len(complete) == 6 and all(len(t.values) == 2 for t in complete)
    assert "state=COMPLETE value=[" in log_text(tmp_path)

    # Picked up without --direction: the workers get the study's two directions.
    result = _run(
        tmp_path, study_name, MULTI, "--sampler", "tpe", "--workers", "2", "--n-trials", "16",
        *limits,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    later = [t for t in load_trials(url, study_name) if t.number >= 10]
    assert len(later) == 6 and all(t.state == TrialState.COMPLETE for t in later)
    assert all(len(t.values) == 2 for t in later)

    result = run_cli("report", "--study", study_name, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["directions"] == ["minimize", "minimize"] and data["direction"] is None
    assert data["best"] is None
    front = {row["trial"]: row["values"] for row in data["best_trials"]}
    expected = optuna.load_study(study_name=study_name, storage=url).best_trials
    assert front == {t.number: t.values for t in expected} and front
    assert data["guard_prunes"] == {"timeout": 1}  # the guard sections are all still there
    assert data["states"] == {"COMPLETE": 12, "FAIL": 3, "PRUNED": 1}
    assert {"memory_trend", "patterns", "slowest", "closest_to_limits", "points"} <= set(data)
    text = run_cli("report", "--study", study_name, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert f"Pareto front of {len(front)} trial(s)" in text.stdout


def test_direction_mismatch_and_patience_are_refused(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    study = optuna.create_study(
        study_name="two", storage=url, directions=["minimize", "maximize"]
    )
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0), n_trials=2)
    before = [(t.number, t.state, t.values) for t in load_trials(url, "two")]

    line = one_error_line(_run(tmp_path, "two", FAST, "--direction", "minimize"))
    assert "study 'two' exists with direction minimize,maximize, not minimize" in line
    line = one_error_line(_run(tmp_path, "two", FAST, "--directions", "maximize,minimize"))
    assert "not maximize,minimize" in line
    line = one_error_line(_run(tmp_path, "two", FAST, "--patience", "3"))
    assert "--patience needs a single-objective study: this one has 2 objectives" in line
    assert [(t.number, t.state, t.values) for t in load_trials(url, "two")] == before
    assert study.user_attrs == optuna.load_study(study_name="two", storage=url).user_attrs

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    line = one_error_line(
        _run(fresh, "new", FAST, "--direction", "minimize", "--direction", "maximize",
             "--patience", "3")
    )  # fmt: skip
    assert "--patience needs a single-objective study" in line
    assert not (fresh / "optguard.db").exists()  # nothing created


def test_cmaes_is_refused_for_a_multi_objective_study(tmp_path: Path) -> None:
    """--sampler cmaes would create the study and fail every trial (exit 5): refused as bad
    input instead, one line, exit 2, nothing created or changed; for an existing study by
    the supervisor's prepare_study and by a worker started by hand (_open_study)."""
    from optguard.supervision.supervisor import prepare_study
    from optguard.worker import _open_study

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    line = one_error_line(
        _run(fresh, "new", FAST, "--directions", "minimize,maximize", "--sampler", "cmaes")
    )
    assert "--sampler cmaes needs a single-objective study: this one has 2 objectives" in line
    assert not (fresh / "optguard.db").exists()  # nothing created
    line = one_error_line(run_cli(
        "worker", "--study", "new", "--objective", FAST, "--directions", "minimize,maximize",
        "--sampler", "cmaes", cwd=fresh,
    ))  # fmt: skip
    assert "--sampler cmaes needs a single-objective study" in line
    assert not (fresh / "optguard.db").exists()

    url = sqlite_url(tmp_path)
    study = optuna.create_study(study_name="two", storage=url, directions=["minimize"] * 2)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0), n_trials=2)
    study.enqueue_trial({"x": 0.5})  # recovery would leave it, but must not even run
    before = [(t.number, t.state, t.values) for t in load_trials(url, "two")]
    opts = resolve_options({"study": "two", "objective": FAST, "storage": url,
                            "sampler": "cmaes"})  # fmt: skip
    with pytest.raises(UsageError, match="^study 'two': --sampler cmaes needs a single-"
                                         "objective study: this one has 2 objectives"):
        prepare_study(opts)
    with pytest.raises(UsageError, match="^study 'two': --sampler cmaes needs a single-"):
        _open_study(opts, url)
    assert [(t.number, t.state, t.values) for t in load_trials(url, "two")] == before
    assert optuna.load_study(study_name="two", storage=url).user_attrs == study.user_attrs
    prepare_study(resolve_options({"study": "two", "objective": FAST, "storage": url,
                                   "sampler": "nsga2"}))  # fmt: skip


def test_cmaes_on_an_existing_multi_objective_study_is_exit_2(tmp_path: Path) -> None:
    pytest.importorskip("cmaes")  # else the missing package is refused first (also exit 2)
    url = sqlite_url(tmp_path)
    optuna.create_study(study_name="two", storage=url, directions=["minimize"] * 2)
    line = one_error_line(_run(tmp_path, "two", FAST, "--sampler", "cmaes"))
    assert "study 'two': --sampler cmaes needs a single-objective study" in line
    assert load_trials(url, "two") == []
    line = one_error_line(run_cli(
        "worker", "--study", "two", "--objective", FAST, "--storage", url,
        "--sampler", "cmaes", cwd=tmp_path,
    ))  # fmt: skip
    assert "study 'two': --sampler cmaes needs a single-objective study" in line
    assert load_trials(url, "two") == []


@pytest.mark.scenario
@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_constraints_reach_the_sampler_also_for_pruned_and_killed_trials(
    tmp_path: Path, study_name: str, sampler: str
) -> None:
    result = _run(
        tmp_path, study_name, objective("constrained.py:objective"), "--sampler", sampler,
        "--n-trials", "5", "--timeout", "1", "--grace", "1", "--kill-after", "1",
        "--pruner", "none",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert [t.state for t in trials] == [TrialState.COMPLETE] + [TrialState.PRUNED] * 2 + [
        TrialState.COMPLETE
    ] * 2  # fmt: skip
    assert trials[1].user_attrs["optguard.enforcement"] == "interrupt"
    assert trials[2].user_attrs["optguard.hard_kill"] is True
    assert [t.constraints for t in trials] == [{"c": -1.0}, {"c": 1.0}, {"c": 1.0}] + [
        {"c": -1.0}
    ] * 2  # fmt: skip
    # Seen in a worker by the samplers' own readers: the pruned and the killed trial.
    assert trials[4].user_attrs["tpe_infeasible"] == [1, 2]
    assert trials[4].user_attrs["nsga2_penalty"] == {"0": 0.0, "1": 1.0, "2": 1.0, "3": 0.0}


@pytest.mark.scenario
def test_seed_gives_the_same_first_trials_and_workers_differ(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)

    def run(study: str, n: str) -> list[dict[str, Any]]:
        result = _run(tmp_path, study, FAST, "--n-trials", n, "--pruner", "none", "--seed", "7")
        assert result.returncode == 0, result.stderr
        return [t.params for t in load_trials(url, study)]

    first = run("a", "2")
    assert run("b", "2") == first  # a fresh study, the same seed: the same trials
    assert "Sampler tpe seeded with" in log_text(tmp_path)
    # Resumed: the worker starts with 2 trials in the study, so another seed; the same one
    # would sample trial #0's point again.
    assert run("a", "3")[2] != first[0]
    # Worker 1 of a run on a fresh study: another seed than worker 0's, another first point
    # (started by hand, deterministically at the same trial count as worker 0 was).
    result = run_cli(
        "worker", "--study", "w1", "--objective", FAST, "--storage", url, "--index", "1",
        "--seed", "7", "--n-trials", "1", "--pruner", "none", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert load_trials(url, "w1")[0].params != first[0]
