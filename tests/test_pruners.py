"""Pruners by name (wilcoxon, patient:N) and --terminate (Optuna's terminator, evaluated by
the supervisor): decisions as tables, then real runs."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import load_trials, log_text, objective, one_error_line, run_cli, sqlite_url
from optuna.trial import TrialState

from optguard.config import resolve_options
from optguard.control import CONTROL_ATTR
from optguard.errors import UsageError
from optguard.study import PrunerSpec, make_pruner, parse_pruner
from optguard.supervision.workers import worker_argv
from optguard.termination import (
    TERMINATED_ATTR,
    TerminatorWatch,
    Verdict,
    terminate_due,
    terminate_error,
    terminate_verdict,
)

BASE = {"study": "s", "objective": "m:f"}
FOLDS = objective("pruner_folds.py:objective")
TERMINATING = objective("terminating.py:objective")
NO_SCORES = objective("terminating.py:no_scores")
FAST = objective("fast.py:objective")


# -- --pruner: the forms ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "spec", "text"),
    [
        ("median", PrunerSpec("median"), "median"),
        (" Hyperband ", PrunerSpec("hyperband"), "hyperband"),
        ("none", PrunerSpec("none"), "none"),
        ("halving", PrunerSpec("halving"), "halving"),
        ("wilcoxon", PrunerSpec("wilcoxon"), "wilcoxon"),
        ("wilcoxon:0.05", PrunerSpec("wilcoxon", 0.05), "wilcoxon:0.05"),
        ("wilcoxon:1", PrunerSpec("wilcoxon", 1.0), "wilcoxon:1"),
        ("patient:3", PrunerSpec("median", None, 3), "patient:3:median"),
        ("patient:2:hyperband", PrunerSpec("hyperband", None, 2), "patient:2:hyperband"),
        ("patient:1:none", PrunerSpec("none", None, 1), "patient:1:none"),
        ("patient:4:wilcoxon:0.2", PrunerSpec("wilcoxon", 0.2, 4), "patient:4:wilcoxon:0.2"),
        # P reaches the worker exactly as asked for: no rounding to 6 digits (``:g``)
        ("wilcoxon:0.12345678", PrunerSpec("wilcoxon", 0.12345678), "wilcoxon:0.12345678"),
        ("wilcoxon:0.1000001", PrunerSpec("wilcoxon", 0.1000001), "wilcoxon:0.1000001"),
        ("wilcoxon:1e-7", PrunerSpec("wilcoxon", 1e-7), "wilcoxon:1e-07"),
        ("wilcoxon:0.30000000000000004", PrunerSpec("wilcoxon", 0.1 + 0.2),
         "wilcoxon:0.30000000000000004"),
        ("patient:2:wilcoxon:0.0123456789",
         PrunerSpec("wilcoxon", 0.0123456789, 2), "patient:2:wilcoxon:0.0123456789"),
    ],
)  # fmt: skip
def test_parse_pruner(value: str, spec: PrunerSpec, text: str) -> None:
    assert parse_pruner(value) == spec
    assert spec.text == text and parse_pruner(text) == spec  # what a worker is given


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("bogus", "--pruner must be one of median, none, halving, hyperband, wilcoxon[:P], "
                  "patient:N[:PRUNER], got 'bogus'"),
        ("", "--pruner must be one of"),
        ("median:3", "--pruner: median takes no ':' argument"),
        ("wilcoxon:0", "--pruner: wilcoxon:P needs a p-value 0 < P <= 1"),
        ("wilcoxon:1.5", "wilcoxon:P needs a p-value"),
        ("wilcoxon:nan", "wilcoxon:P needs a p-value"),
        ("wilcoxon:", "wilcoxon:P needs a p-value"),
        ("patient", "--pruner: patient:N needs a whole number of steps N"),
        ("patient:x", "patient:N needs a whole number of steps N"),
        ("patient:2.5", "patient:N needs a whole number of steps N"),
        ("patient:0", "--pruner: patient:N needs N >= 1"),
        ("patient:2:", "--pruner: nothing after the last ':'"),
        ("patient:2:patient:1", "patient:N cannot wrap another patient"),
        ("patient:2:bogus", "--pruner must be one of"),
    ],
)
def test_parse_pruner_refuses(value: str, error: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_pruner(value)
    assert error in str(info.value) and str(info.value).startswith("--pruner"), info.value


def test_make_pruner_builds_the_named_pruners() -> None:
    assert type(make_pruner("wilcoxon:0.05")) is optuna.pruners.WilcoxonPruner
    assert make_pruner("wilcoxon:0.05")._p_threshold == 0.05
    patient = make_pruner("patient:3:hyperband")
    assert type(patient) is optuna.pruners.PatientPruner and patient._patience == 3
    assert type(patient._wrapped_pruner) is optuna.pruners.HyperbandPruner
    assert type(make_pruner("patient:2")._wrapped_pruner) is optuna.pruners.MedianPruner
    assert make_pruner("patient:2:none")._wrapped_pruner is None  # the patience alone


def test_pruner_and_terminate_options_and_worker_argv(tmp_path: Path) -> None:
    opts = resolve_options({**BASE, "pruner": "Patient:2", "terminate": True})
    assert opts.pruner == "patient:2:median" and opts.terminate is True
    argv = worker_argv(opts, 0)
    assert argv[argv.index("--pruner") + 1] == "patient:2:median"
    assert "--terminate" not in argv  # the supervisor's alone
    cfg = tmp_path / "c.toml"
    cfg.write_text('pruner = "wilcoxon:0.05"\nterminate = true\n')
    from_file = resolve_options(BASE, cfg)
    assert (from_file.pruner, from_file.terminate) == ("wilcoxon:0.05", True)
    assert resolve_options({**BASE, "terminate": False}, cfg).terminate is False  # flag wins
    assert resolve_options(BASE).terminate is False and resolve_options(BASE).pruner == "median"
    exact = resolve_options({**BASE, "pruner": "wilcoxon:0.12345678"})
    argv = worker_argv(exact, 0)
    assert argv[argv.index("--pruner") + 1] == "wilcoxon:0.12345678"
    assert make_pruner(exact.pruner)._p_threshold == 0.12345678  # the worker's, exactly
    cfg.write_text('pruner = "patient:x"\n')
    with pytest.raises(UsageError, match=r"pruner \(in .*c.toml\): patient:N needs a whole"):
        resolve_options(BASE, cfg)
    cfg.write_text('terminate = "yes"\n')
    with pytest.raises(UsageError, match="terminate must be bool, got str"):
        resolve_options(BASE, cfg)
    with pytest.raises(UsageError, match="--terminate needs a single-objective study"):
        resolve_options({**BASE, "directions": "minimize,maximize", "terminate": True})


def _prunes_at(pruner: optuna.pruners.BasePruner, values: list[float]) -> int | None:
    """The first step at which a trial reporting ``values`` is pruned, after 5 complete
    trials that reported 1.0 at every step (MedianPruner's startup)."""
    study = optuna.create_study(pruner=pruner)

    def complete(trial: optuna.Trial) -> float:
        for step in range(len(values)):
            trial.report(1.0, step)
        return 1.0

    study.optimize(complete, n_trials=5)
    trial = study.ask()
    for step, value in enumerate(values):
        trial.report(value, step)
        if trial.should_prune():
            return step
    return None


def test_patient_delays_the_wrapped_prune() -> None:
    values = [5.0, 4.0, 3.0, 3.5, 3.5, 3.5, 3.5]  # worse than the median throughout
    assert _prunes_at(make_pruner("median"), values) == 0
    # Improving until step 2, then 3 steps without beating 3.0: pruned once the window of 2+1
    # steps after the best holds no improvement, and only then asked to the median pruner.
    assert _prunes_at(make_pruner("patient:2"), values) == 5
    assert _prunes_at(make_pruner("patient:3"), values) == 6
    assert _prunes_at(make_pruner("patient:2"), [5.0, 4.0, 3.0, 2.0, 1.5, 1.2, 1.1]) is None


# -- --terminate: the decisions -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("since_s", "busy", "complete", "evaluated", "due"),
    [
        (float("inf"), False, 0, 0, False),  # never read, nothing complete
        (float("inf"), False, 19, 0, False),  # below Optuna's 20 complete trials
        (float("inf"), False, 20, 0, True),  # never read: read and evaluate now
        (float("inf"), True, 25, 0, False),  # an evaluation runs: wait for it
        (1.0, False, 40, 20, False),  # new trials, but the last read was a second ago
        (4.99, False, 40, 20, False),
        (5.0, False, 40, 20, True),
        (6.0, False, 23, 20, True),
        (6.0, True, 23, 20, False),
        # Nothing completed since the last evaluation: no read at all, however long ago it
        # was (it used to re-read every trial at every 1 s tick once 5 s had passed).
        (6.0, False, 20, 20, False),
        (600.0, False, 5000, 5000, False),
        (600.0, False, 4990, 5000, False),  # the progress's count lags the last read
    ],
)
def test_terminate_due(
    since_s: float, busy: bool, complete: int, evaluated: int, due: bool
) -> None:
    assert terminate_due(since_s, busy, complete, evaluated) is due


@pytest.mark.parametrize(
    ("result", "reason", "notice", "disable"),
    [
        (True, "terminator: the room left for improvement (regret bound) is below the "
               "statistical error after 25 complete trials", None, False),
        (False, None, None, False),
        (ValueError("Cross-validation scores have not been reported."), None,
         "--terminate cannot decide yet (ValueError: Cross-validation scores have not been "
         "reported.); the run goes on", False),
        (ImportError("No module named 'torch'"), None, "--terminate cannot decide yet", False),
        (RuntimeError("linalg"), None, "--terminate cannot decide yet", False),
        (KeyError("x"), None, "--terminate disabled for this run: the terminator raised "
                              "KeyError", True),
    ],
)  # fmt: skip
def test_terminate_verdict(
    result: Any, reason: str | None, notice: str | None, disable: bool
) -> None:
    verdict = terminate_verdict(result, 25)
    assert verdict.reason == reason and verdict.disable is disable
    assert (verdict.notice is None) if notice is None else verdict.notice.startswith(notice)


@pytest.mark.parametrize(
    ("terminate", "n", "refused"),
    [(None, 2, False), (False, 3, False), (True, 1, False), (True, 2, True)],
)
def test_terminate_error(terminate: bool | None, n: int, refused: bool) -> None:
    assert (terminate_error(terminate, n) is not None) == refused


def _complete_trials(n: int) -> list[optuna.trial.FrozenTrial]:
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=n)
    return study.get_trials(states=(TrialState.COMPLETE,))


class _Loader:
    """The study's complete trials, counting the reads."""

    def __init__(self, trials: list[optuna.trial.FrozenTrial]) -> None:
        self.trials = trials
        self.reads = 0

    def __call__(self) -> list[optuna.trial.FrozenTrial]:
        self.reads += 1
        return self.trials


def test_watch_runs_one_evaluation_at_a_time_and_tells_a_notice_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from optguard import termination

    release = threading.Event()
    answers: list[Any] = [ValueError("no scores"), ValueError("no scores"), KeyError("bug")]

    def fake(trials: Any, direction: str) -> bool:
        release.wait(10)
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return bool(answer)

    monkeypatch.setattr(termination, "should_terminate", fake)
    watch = TerminatorWatch("minimize")
    trials = _complete_trials(25)
    load = _Loader(trials[:20])
    assert not watch.offer(0.0, 19, load) and load.reads == 0  # too few: nothing read
    assert watch.offer(0.0, 20, load) and watch.busy and load.reads == 1
    assert not watch.due(100.0, 25) and watch.collect() is None  # still evaluating
    release.set()
    watch._thread.join(10)  # type: ignore[union-attr]
    first = watch.collect()
    assert first is not None and first.notice is not None and "no scores" in first.notice
    assert not watch.due(1.0, 22) and watch.due(10.0, 22)
    for tick in range(10, 100):  # nothing new: not read again, however many ticks pass
        assert not watch.offer(float(tick), 20, load)
    assert load.reads == 1
    load.trials = trials[:22]
    assert watch.offer(100.0, 22, load) and load.reads == 2
    watch._thread.join(10)  # type: ignore[union-attr]
    assert watch.collect() == Verdict()  # the same notice is not told twice
    load.trials = trials
    assert not watch.offer(101.0, 25, load)  # 5 s between reads
    assert watch.offer(105.0, 25, load) and load.reads == 3
    watch._thread.join(10)  # type: ignore[union-attr]
    last = watch.collect()
    assert last is not None and last.disable and "KeyError" in (last.notice or "")
    assert not watch.due(200.0, 100) and not watch.offer(200.0, 100, load)  # disabled
    assert load.reads == 3


def test_watch_reads_no_more_than_the_storage_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A count ahead of what the read returns (it cannot happen, complete trials stay
    complete) starts no evaluation below Optuna's minimum, and reads again only 5 s later."""
    from optguard import termination

    monkeypatch.setattr(termination, "should_terminate", lambda trials, direction: False)
    watch = TerminatorWatch("minimize")
    load = _Loader(_complete_trials(19))
    assert not watch.offer(0.0, 20, load) and not watch.busy and load.reads == 1
    assert not watch.offer(1.0, 20, load) and load.reads == 1
    assert not watch.offer(5.0, 20, load) and load.reads == 2


class _CountingStorage:
    def __init__(self, trials: list[optuna.trial.FrozenTrial]) -> None:
        self.trials = trials
        self.reads = 0

    def get_all_trials(self, study_id: int, deepcopy: bool, states: Any) -> Any:
        assert states == (TrialState.COMPLETE,) and not deepcopy
        self.reads += 1
        return self.trials


def test_supervisor_reads_the_complete_trials_only_for_an_evaluation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The supervisor's check once a second over 60 s, 25 complete trials throughout: one
    read of the trials (the first evaluation), not one per tick once 5 s passed."""
    from optguard import termination
    from optguard.progress import Progress
    from optguard.supervision import supervisor

    evaluated: list[int] = []
    monkeypatch.setattr(
        termination, "should_terminate", lambda trials, d: evaluated.append(len(trials)) or False
    )
    sup: Any = object.__new__(supervisor._Supervisor)
    sup.opts = resolve_options({**BASE, "terminate": True, "directions": "minimize"})
    sup.storage = _CountingStorage(_complete_trials(25))
    sup.study_id, sup.terminator, sup.on_notice, sup.poller = 1, None, None, None
    sup.on_progress, sup.progress_at = (lambda progress: None), 0.0
    sup.progress = Progress(states={"COMPLETE": 25, "RUNNING": 2})
    for tick in range(60):
        sup.check_terminator(float(tick))
        if sup.terminator.busy:
            sup.terminator._thread.join(10)
    assert sup.storage.reads == 1 and evaluated == [25]
    sup.progress = Progress(states={"COMPLETE": 27})  # two more completed
    sup.storage.trials = _complete_trials(27)
    sup.check_terminator(60.0)
    sup.terminator._thread.join(10)
    assert sup.storage.reads == 2 and evaluated == [25, 27]

    # Without on_progress the loop does not read the progress: the check does, every 2 s.
    thirty = _complete_trials(30)
    quiet: Any = object.__new__(supervisor._Supervisor)
    quiet.__dict__.update(sup.__dict__, terminator=None, on_progress=None, progress_at=-10.0)
    quiet.storage = _CountingStorage(thirty[:25])
    progress_reads = []

    def read_progress() -> Progress:  # 5 more trials complete after the 3rd read
        progress_reads.append(1)
        quiet.storage.trials = thirty[: 25 if len(progress_reads) <= 3 else 30]
        return Progress(states={"COMPLETE": len(quiet.storage.trials)})

    monkeypatch.setattr(quiet, "read_progress", read_progress)
    for tick in range(30):
        quiet.check_terminator(float(tick))
        if quiet.terminator.busy:
            quiet.terminator._thread.join(10)
    assert quiet.storage.reads == 2  # at 0 s, then once the count grew
    assert len(progress_reads) == 10  # once more than 2 s passed: at 0, 3, 6... 27 s


def test_terminator_warnings_are_quieted_in_the_main_thread_only_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The evaluation's thread leaves the process-wide warnings filters alone (no
    ``catch_warnings`` there); the watch's maker silenced the terminator's own warnings."""
    import warnings

    from optuna.exceptions import ExperimentalWarning

    from optguard import termination

    original = warnings.catch_warnings
    ours: list[str] = []  # the threads optguard's own code swapped the filters in

    class Spy(original):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            caller = sys._getframe(1).f_code.co_filename
            if Path(caller).parent.name == "optguard":  # not torch's import, say
                ours.append(threading.current_thread().name)
            super().__init__(*args, **kwargs)

    trials = _complete_trials(25)
    with original(record=True) as seen:
        watch = TerminatorWatch("minimize")
        monkeypatch.setattr(warnings, "catch_warnings", Spy)
        assert watch.offer(0.0, 25, lambda: trials)  # the real terminator
        watch._thread.join(120)  # type: ignore[union-attr]
        verdict = watch.collect()  # no CV scores reported: cannot decide (or no torch)
        assert verdict is not None and verdict.reason is None and not verdict.disable, verdict
        assert "optguard-terminator" not in ours, ours
        quieting = [f for f in warnings.filters if f[0] == "ignore" and f[3] is not None
                    and f[3].pattern == termination.TERMINATOR_MODULES]  # fmt: skip
        assert {f[2] for f in quieting} == {FutureWarning, ExperimentalWarning}
        monkeypatch.undo()
        for module in ("optuna.terminator.terminator", "optguard.termination"):
            for category in (FutureWarning, ExperimentalWarning):
                warnings.warn_explicit("quiet", category, "x.py", 1, module=module)
        warnings.warn_explicit("heard", FutureWarning, "x.py", 1, module="optuna.study")
    terminator = [w for w in seen if issubclass(w.category, (FutureWarning, ExperimentalWarning))]
    assert [str(w.message) for w in terminator] == ["heard"], [str(w.message) for w in seen]


# -- real runs -----------------------------------------------------------------------------------
def test_bad_pruner_is_one_line_exit_2_and_creates_nothing(tmp_path: Path) -> None:
    for spec in ("patient:x", "wilcoxon:2", "nope"):
        result = run_cli(
            "run", "--study", "s", "--objective", FAST, "--n-trials", "1", "--pruner", spec,
            cwd=tmp_path,
        )  # fmt: skip
        assert "--pruner" in one_error_line(result)
    cfg = tmp_path / "c.toml"
    cfg.write_text('pruner = "patient:0"\n')
    result = run_cli("run", "--study", "s", "--objective", FAST, "--config", str(cfg),
                     cwd=tmp_path)  # fmt: skip
    assert "patient:N needs N >= 1" in one_error_line(result)
    assert not (tmp_path / "optguard.db").exists() and not (tmp_path / "logs").exists()


@pytest.mark.scenario
def test_wilcoxon_prunes_a_worse_trial_fold_by_fold(tmp_path: Path, study_name: str) -> None:
    """Trial #0 scores about 1.0 per fold, the later ones 1.0 worse on every fold: paired by
    fold id (optguard.splits + trial.report(score, fold)), Wilcoxon prunes them at their 4th
    fold (p = 1/16 < 0.1). The default median pruner would not (5 startup trials)."""
    result = run_cli(
        "run", "--study", study_name, "--objective", FOLDS, "--n-trials", "3",
        "--pruner", "wilcoxon", "--sampler", "random", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    assert len(trials[0].intermediate_values) == 10
    assert [sorted(t.intermediate_values) for t in trials[1:]] == [[0, 1, 2, 3]] * 2
    assert "pruned at fold 3" in log_text(tmp_path)


@pytest.mark.scenario
def test_terminate_ends_the_study_on_every_host(tmp_path: Path, study_name: str) -> None:
    pytest.importorskip("torch")  # Optuna's terminator fits a GP with torch (CI installs it)
    result = run_cli(
        "run", "--study", study_name, "--objective", TERMINATING, "--n-trials", "400",
        "--pruner", "none", "--sampler", "random", "--terminate", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "study ended on purpose: terminator: the room left for improvement" in result.stdout
    study = optuna.load_study(study_name=study_name, storage=sqlite_url(tmp_path))
    assert study.user_attrs[TERMINATED_ATTR].startswith("terminator: the room left")
    assert study.user_attrs[CONTROL_ATTR]["action"] == "stop"  # what `optguard stop` sets
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert 20 <= len(complete) < 400 and len(study.trials) < 400


@pytest.mark.scenario
def test_terminate_without_cv_scores_says_so_once_and_goes_on(
    tmp_path: Path, study_name: str
) -> None:
    pytest.importorskip("torch")
    result = run_cli(
        "run", "--study", study_name, "--objective", NO_SCORES, "--n-trials", "70",
        "--pruner", "none", "--sampler", "random", "--terminate", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--terminate cannot decide yet (ValueError: Cross-validation "
                               "scores have not been reported") == 1, result.stdout
    assert "ended on purpose" not in result.stdout
    study = optuna.load_study(study_name=study_name, storage=sqlite_url(tmp_path))
    assert len(study.trials) == 70 and TERMINATED_ATTR not in study.user_attrs


def test_terminate_is_refused_for_a_multi_objective_study(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    study = optuna.create_study(study_name="two", storage=url, directions=["minimize"] * 2)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0), n_trials=2)
    before = [(t.number, t.state, t.values) for t in load_trials(url, "two")]
    result = run_cli("run", "--study", "two", "--objective", FAST, "--terminate", cwd=tmp_path)
    line = one_error_line(result)
    assert "study 'two': --terminate needs a single-objective study: this one has 2" in line
    assert [(t.number, t.state, t.values) for t in load_trials(url, "two")] == before
    assert optuna.load_study(study_name="two", storage=url).user_attrs == study.user_attrs

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    result = run_cli(
        "run", "--study", "new", "--objective", FAST, "--directions", "minimize,maximize",
        "--terminate", cwd=fresh,
    )  # fmt: skip
    assert "--terminate needs a single-objective study" in one_error_line(result)
    assert not (fresh / "optguard.db").exists()  # nothing created
