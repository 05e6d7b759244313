"""GPUs per worker and ``--max-vram`` (issue 14).

Without a GPU: the assignment of ``CUDA_VISIBLE_DEVICES`` across workers and replacements
(pure, and in real runs), option validation, out-of-memory errors recorded as the guard's
own, and that nothing imports torch or initializes CUDA for an objective that does not. With
a GPU that NVML finds (skipped otherwise): the limit prunes a leaking trial.
"""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
from conftest import load_trials, log_text, objective, one_error_line, run_cli, sqlite_url
from optuna.trial import TrialState

from optguard import gpus
from optguard.errors import UsageError
from optguard.guard import ENFORCEMENT_OOM, REASON_GPU_MEMORY, Violation
from optguard.limits import Escalation, Limits
from optguard.supervision.escalation import Step, Watched, decide
from optguard.supervision.outcome import Ended, fail_fast_error

MB = 10**6
GB = 10**9


def _nvml_count() -> int | None:
    """GPUs NVML counts here; ``None`` when it cannot tell (not installed, no driver)."""
    lib = gpus.nvml()
    return None if lib is None else lib.count()


def _run(cwd: Path, study: str, target: str, *extra: str, env: dict[str, str] | None = None):
    return run_cli(
        "run", "--study", study, "--objective", objective(target), "--pruner", "none", *extra,
        cwd=cwd, env=env,
    )  # fmt: skip


# -- pure: parsing, grouping, assignment --------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "devices"),
    [
        ("0,1,2,3", ("0", "1", "2", "3")),
        (" 2, 0 ", ("2", "0")),  # the order given is the order shared out
        ("007", ("7",)),
        (3, ("3",)),
        ([0, 1], ("0", "1")),  # a TOML list
        ("all", None),
        ("ALL", None),
    ],
)
def test_parse_gpus(value: object, devices: tuple[str, ...] | None) -> None:
    assert gpus.parse_gpus(value) == devices  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0,x", "expected GPU indices like 0,1,2,3 or all"),
        ("", "expected GPU indices"),
        ("0,,1", "expected GPU indices"),
        ("-1", "expected GPU indices"),
        ("0,1,0", "GPU 0 is listed twice"),
        ("\u00b2", "expected GPU indices"),  # str.isdigit() says yes, int() says no
        ("\u0663", "expected GPU indices"),  # an Arabic-Indic 3: not CUDA's
        (["\u00b2"], "expected GPU indices"),
        (True, "expected GPU indices"),
        ([0, "a"], "expected GPU indices"),
    ],
)
def test_parse_gpus_refuses(value: object, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        gpus.parse_gpus(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("devices", "per_worker", "groups"),
    [
        (("0", "1", "2", "3"), 1, (("0",), ("1",), ("2",), ("3",))),
        (("0", "1", "2", "3"), 2, (("0", "1"), ("2", "3"))),
        (("3", "1"), 2, (("3", "1"),)),
        (("GPU-a", "GPU-b"), 1, (("GPU-a",), ("GPU-b",))),  # an inherited UUID list
    ],
)
def test_group_devices(devices: tuple[str, ...], per_worker: int, groups: object) -> None:
    assert gpus.group_devices(devices, per_worker) == groups


@pytest.mark.parametrize(
    ("devices", "per_worker", "message"),
    [
        (("0", "1", "2"), 2, "3 GPU\\(s\\) \\(0,1,2\\) do not split into groups of 2"),
        (("0",), 2, "do not split into groups of 2"),
        (("0",), 0, "must be at least 1"),
    ],
)
def test_group_devices_refuses(devices: tuple[str, ...], per_worker: int, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        gpus.group_devices(devices, per_worker)


GROUPS = (("0", "1"), ("2", "3"))


@pytest.mark.parametrize(
    ("groups", "index", "devices"),
    [
        (GROUPS, 0, ("0", "1")),
        (GROUPS, 1, ("2", "3")),
        (GROUPS, 2, ("0", "1")),  # more workers than groups: wrapping round
        (GROUPS, 3, ("2", "3")),
        ((), 0, ()),  # no --gpus: nothing assigned
    ],
)
def test_assign_devices(groups: object, index: int, devices: tuple[str, ...]) -> None:
    assert gpus.assign_devices(groups, index) == devices  # type: ignore[arg-type]


def test_a_replacement_gets_the_gpus_of_the_worker_it_replaces() -> None:
    """Workers are replaced under their own index (a death, a recycle): the same group, however
    many replacements came before, and whatever the other workers did meanwhile."""
    groups = gpus.group_devices(("0", "1", "2", "3"), 1)
    first = {index: gpus.assign_devices(groups, index) for index in range(4)}
    for spawn_order in ([1, 1, 3, 0, 1], [2, 0, 2, 2]):
        for index in spawn_order:
            assert gpus.assign_devices(groups, index) == first[index]


@pytest.mark.parametrize(
    ("environ", "inherited"),
    [
        ({}, None),
        ({"CUDA_VISIBLE_DEVICES": "2,3"}, ["2", "3"]),
        ({"CUDA_VISIBLE_DEVICES": " GPU-a , GPU-b "}, ["GPU-a", "GPU-b"]),
        ({"CUDA_VISIBLE_DEVICES": ""}, []),
        ({"CUDA_VISIBLE_DEVICES": "-1"}, []),
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, []),
    ],
)
def test_inherited_devices(environ: dict[str, str], inherited: list[str] | None) -> None:
    assert gpus.inherited_devices(environ) == inherited


@pytest.mark.parametrize(
    ("indices", "inherited", "devices"),
    [
        (("0", "1"), ["2", "3"], ("2", "3")),
        (("1",), ["GPU-a", "GPU-b"], ("GPU-b",)),
        (("1", "0"), ["5", "7"], ("7", "5")),
        (("2",), ["2", "3"], "GPU 2 is outside the inherited CUDA_VISIBLE_DEVICES='2,3'"),
        (("0",), [], "GPU 0 is outside the inherited"),
    ],
)
def test_within_inherited(indices: tuple[str, ...], inherited: list[str], devices: object) -> None:
    if isinstance(devices, str):
        with pytest.raises(UsageError, match=re.escape(devices)):
            gpus.within_inherited(indices, inherited)
    else:
        assert gpus.within_inherited(indices, inherited) == devices


def test_nvml_handle_refuses_unicode_digits() -> None:
    class _Module:
        class NVMLError(Exception):
            pass

        def nvmlDeviceGetCount(self) -> int:
            return 1

        def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
            return f"h{i}"

        def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
            raise self.NVMLError(uuid)

    lib = gpus.Nvml(_Module())
    assert lib.handle("0") == "h0"
    assert lib.handle("\u00b2") is None  # not index 2, not a crash


@pytest.mark.parametrize(
    ("devices", "environ", "env"),
    [
        (("0", "1"), {}, {"CUDA_VISIBLE_DEVICES": "0,1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}),
        (("2",), {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}, {"CUDA_VISIBLE_DEVICES": "2"}),
        (("2",), {"CUDA_DEVICE_ORDER": " "}, {"CUDA_VISIBLE_DEVICES": "2",
                                               "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}),
        ((), {"CUDA_VISIBLE_DEVICES": "5"}, {}),  # no --gpus: the worker inherits the run's
        # the scheduler's entries, in its order: no PCI_BUS_ID reordering of them
        (("GPU-a",), {"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b"}, {"CUDA_VISIBLE_DEVICES": "GPU-a"}),
        (("3",), {"CUDA_VISIBLE_DEVICES": "2,3"}, {"CUDA_VISIBLE_DEVICES": "3"}),
    ],
)
def test_gpu_env(devices: tuple[str, ...], environ: dict[str, str], env: dict[str, str]) -> None:
    assert gpus.gpu_env(devices, environ) == env


@pytest.mark.parametrize(
    ("groups", "workers", "text"),
    [
        ((("0",), ("1",)), 2, "GPUs 0 | 1 (1 per worker)"),
        (GROUPS, 2, "GPUs 0,1 | 2,3 (2 per worker)"),
        (GROUPS, 4, "GPUs 0,1 | 2,3 (2 per worker, 4 workers share 2 group(s))"),
        (GROUPS, 1, "GPUs 0,1 | 2,3 (2 per worker; 1 worker(s) for 2 groups: GPUs 2,3 stay "
                    "unused)"),
        ((("0",), ("1",), ("2",)), 1, "GPUs 0 | 1 | 2 (1 per worker; 1 worker(s) for 3 groups: "
                                      "GPUs 1 | 2 stay unused)"),
        ((), 3, ""),
    ],
)
def test_describe_groups(groups: object, workers: int, text: str) -> None:
    assert gpus.describe_groups(groups, workers) == text  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "limit"),
    [
        ("8GB", (8 * GB, None)),
        ("512MiB", (512 * 2**20, None)),
        (10**9, (GB, None)),
        ("90%", (None, 90.0)),
        (" 12.5 %", (None, 12.5)),
    ],
)
def test_parse_vram(value: object, limit: tuple[int | None, float | None]) -> None:
    assert gpus.parse_vram(value) == limit  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["0", "0%", "120%", "lots", "-1GB"])
def test_parse_vram_refuses(value: str) -> None:
    with pytest.raises(UsageError, match="--max-vram"):
        gpus.parse_vram(value)


def test_percent_of_totals() -> None:
    assert gpus.percent_of(50.0, [80 * GB, 80 * GB]) == 80 * GB
    assert gpus.percent_of(90.0, []) is None  # unknown: the limit waits for the GPUs


def test_gpu_memory_violation_reads_like_the_memory_one() -> None:
    violation = Violation(3, REASON_GPU_MEMORY, 2.0, 5_100 * MB, 5 * GB)
    assert violation.log_line() == (
        "Trial #3 pruned: GPU memory limit exceeded: 5.1GB (limit 5GB)"
    )
    assert violation.limit_in_unit() == {"limit_bytes": 5 * GB, "vram_bytes": 5_100 * MB}
    oom = Violation(3, REASON_GPU_MEMORY, 2.0, 7 * GB, 0.0, enforcement=ENFORCEMENT_OOM)
    assert oom.log_line() == (
        "Trial #3 pruned: GPU memory exhausted: the objective ran out of memory "
        "(GPU memory 7.00GB)"
    )
    under = Violation(3, REASON_GPU_MEMORY, 2.0, 7 * GB, 8 * GB, enforcement=ENFORCEMENT_OOM)
    assert under.detail == "GPU memory 7.0GB against limit 8GB"


def test_oom_reason_never_imports_torch() -> None:
    import sys

    assert gpus.oom_reason(MemoryError()) == "memory"
    assert gpus.oom_reason(RuntimeError("CUDA out of memory")) is None  # only the real class
    if "torch" in sys.modules:
        import torch

        assert gpus.oom_reason(torch.OutOfMemoryError("x")) == REASON_GPU_MEMORY


class _TorchOom(RuntimeError):
    pass


class _CupyOom(MemoryError):  # CuPy's derives from MemoryError: GPU memory all the same
    pass


class _ArrayMemoryError(MemoryError):
    pass


class _Quota(MemoryError):  # a user's own subclass, raised for another reason
    pass


class _Mod:
    def __init__(self, **attrs: object) -> None:
        self.__dict__.update(attrs)


FAKE_MODULES = {
    "torch": _Mod(OutOfMemoryError=_TorchOom),
    "torch.cuda": _Mod(OutOfMemoryError=_TorchOom),
    "cupy.cuda.memory": _Mod(OutOfMemoryError=_CupyOom),
    "numpy._core._exceptions": _Mod(_ArrayMemoryError=_ArrayMemoryError),
}


@pytest.mark.parametrize(
    ("exc", "modules", "reason"),
    [
        (MemoryError("x"), {}, "memory"),
        (_TorchOom("CUDA out of memory"), FAKE_MODULES, REASON_GPU_MEMORY),
        (_CupyOom("out of memory allocating"), FAKE_MODULES, REASON_GPU_MEMORY),
        (_CupyOom("x"), {}, None),  # cupy not imported: a MemoryError subclass, not ours
        (_ArrayMemoryError("x"), FAKE_MODULES, "memory"),
        (_Quota("API quota exceeded"), FAKE_MODULES, None),
        (RuntimeError("CUDA out of memory"), FAKE_MODULES, None),  # only the real class
    ],
)
def test_oom_reason(exc: BaseException, modules: dict[str, object], reason: str | None) -> None:
    assert gpus.oom_reason(exc, modules) == reason


# -- pure: the supervisor's decision on GPU memory ----------------------------------------------
VRAM_LIMITS = Limits(timeout_s=10.0, max_rss_bytes=100 * MB, max_vram_bytes=1000 * MB)
ESC = Escalation(grace_s=1.0, memory_grace_s=0.0, kill_after_s=2.0, memory_ceiling=1.25)
GRACE = Escalation(grace_s=1.0, memory_grace_s=3.0, kill_after_s=2.0, memory_ceiling=1.25)
SOFT_VRAM = Violation(0, REASON_GPU_MEMORY, 1.0, 1100 * MB, 1000 * MB)


@pytest.mark.parametrize(
    ("limits", "esc", "state", "vram", "now", "step"),
    [
        (VRAM_LIMITS, ESC, {}, 900 * MB, 1.0, None),  # within the limit
        (VRAM_LIMITS, ESC, {}, 1100 * MB, 1.0, Step.INTERRUPT),  # no memory grace
        (VRAM_LIMITS, ESC, {}, 1300 * MB, 1.0, Step.KILL_NOW),  # above the 1.25x ceiling
        (VRAM_LIMITS, GRACE, {}, 1100 * MB, 1.0, Step.SOFT),  # --memory-grace applies too
        (VRAM_LIMITS, GRACE, {"violation": SOFT_VRAM, "violation_at": 1.0}, 1100 * MB, 3.0, None),
        (VRAM_LIMITS, GRACE, {"violation": SOFT_VRAM, "violation_at": 1.0}, 1100 * MB, 4.5,
         Step.INTERRUPT),
        (Limits(max_vram_bytes=None), ESC, {}, 10**12, 1.0, None),  # no --max-vram
    ],
)
def test_decide_on_gpu_memory(
    limits: Limits, esc: Escalation, state: dict[str, object], vram: int, now: float,
    step: Step | None,
) -> None:  # fmt: skip
    trial = Watched(number=0, trial_id=1, started=0.0)
    for key, value in state.items():
        setattr(trial, key, value)
    decision = decide(trial, 50 * MB, 1.0, now, limits, esc, vram=vram)
    assert (decision[0] if decision else None) is step
    if decision is not None:
        assert decision[1].reason == REASON_GPU_MEMORY
        assert decision[1].rss_bytes == vram and decision[1].limit == 1000 * MB


@pytest.mark.parametrize(
    ("limits", "flag"),
    [
        (Limits(max_vram_bytes=8 * GB), ["--max-vram", repr(8 * GB)]),
        (Limits(max_vram_percent=90.0), ["--max-vram", "90.0%"]),  # NVML could not resolve it
        (Limits(), []),
    ],
)
def test_workers_are_given_the_vram_limit(limits: Limits, flag: list[str]) -> None:
    from optguard.config import RunOptions
    from optguard.supervision.workers import worker_argv

    argv = worker_argv(RunOptions(study="s", objective="m:f", limits=limits), 0)
    given = argv[argv.index("--max-vram") : argv.index("--max-vram") + 2] if flag else []
    assert given == flag
    assert "--gpus" not in argv  # GPUs reach a worker through its environment only


# -- real runs, no GPU needed ----------------------------------------------------------------------
def _needs_unvalidated(*indices: int) -> None:
    """Indices are only checked where NVML can count: skip where it counts fewer."""
    count = _nvml_count()
    if count is not None and max(indices) >= count:
        pytest.skip(f"NVML counts {count} GPU(s) here: GPU {max(indices)} would be refused")


def test_each_worker_gets_its_own_gpus_and_workers_default_to_the_groups(
    tmp_path: Path, study_name: str
) -> None:
    _needs_unvalidated(3)
    result = _run(
        tmp_path, study_name, "gpu_probe.py:env", "--n-trials", "6", "--gpus", "0,1,2,3",
        "--gpus-per-worker", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2 worker(s)" in result.stdout.splitlines()[0]
    assert "GPUs 0,1 | 2,3 (2 per worker)" in result.stdout.splitlines()[0]
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert len(trials) == 6 and {t.state for t in trials} == {TrialState.COMPLETE}
    groups = {"0": "0,1", "1": "2,3"}
    for t in trials:
        index = t.user_attrs["probe.worker"].split(".")[0]
        assert t.user_attrs["probe.devices"] == groups[index]
        assert t.user_attrs["probe.order"] == "PCI_BUS_ID"
    assert {t.user_attrs["probe.worker"].split(".")[0] for t in trials} == {"0", "1"}
    log = log_text(tmp_path)
    assert re.search(r"worker=0:\d+ trial=- Worker started: .* gpus=0,1\b", log)
    assert re.search(r"worker=1:\d+ trial=- Worker started: .* gpus=2,3\b", log)


def test_replacements_get_the_gpus_of_the_worker_they_replace(
    tmp_path: Path, study_name: str
) -> None:
    """Recycled after every trial (--max-trials-per-worker 1), and a worker that dies: each
    replacement is started under its predecessor's index, with its GPUs."""
    _needs_unvalidated(7)
    result = _run(
        tmp_path, study_name, "gpu_probe.py:env", "--n-trials", "6", "--gpus", "5,7",
        "--max-trials-per-worker", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    trials = load_trials(sqlite_url(tmp_path), study_name)
    spawns = {t.user_attrs["probe.worker"] for t in trials}
    assert len(spawns) == 6  # every trial on a fresh worker
    for t in trials:
        index = t.user_attrs["probe.worker"].split(".")[0]
        assert t.user_attrs["probe.devices"] == {"0": "5", "1": "7"}[index]

    died = _run(
        tmp_path, study_name + "d", "gpu_probe.py:dies_first", "--n-trials", "3", "--gpus", "5",
    )  # fmt: skip
    assert died.returncode == 0, died.stderr
    trials = load_trials(sqlite_url(tmp_path), study_name + "d")
    assert trials[0].state == TrialState.FAIL
    assert trials[0].user_attrs["optguard.reason"] == "worker_died"
    assert {t.user_attrs["probe.devices"] for t in trials} == {"5"}
    assert trials[1].user_attrs["probe.worker"] != trials[0].user_attrs["probe.worker"]
    assert trials[1].user_attrs["probe.worker"].startswith("0.")


def test_more_workers_than_gpus_share_them(tmp_path: Path, study_name: str) -> None:
    _needs_unvalidated(1)
    result = _run(
        tmp_path, study_name, "gpu_probe.py:env", "--n-trials", "6", "--gpus", "0,1",
        "--workers", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "GPUs 0 | 1 (1 per worker, 3 workers share 2 group(s))" in result.stdout
    for t in load_trials(sqlite_url(tmp_path), study_name):
        index = int(t.user_attrs["probe.worker"].split(".")[0])
        assert t.user_attrs["probe.devices"] == str(index % 2)


def test_fewer_workers_than_groups_say_which_gpus_stay_unused(
    tmp_path: Path, study_name: str
) -> None:
    _needs_unvalidated(2)
    result = _run(
        tmp_path, study_name, "gpu_probe.py:env", "--n-trials", "1", "--gpus", "0,1,2",
        "--workers", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "1 worker(s) for 3 groups: GPUs 1 | 2 stay unused" in result.stdout.splitlines()[0]


def test_gpus_all_takes_the_inherited_devices(tmp_path: Path, study_name: str) -> None:
    """Under a scheduler that set CUDA_VISIBLE_DEVICES, ``all`` means its share."""
    result = _run(
        tmp_path, study_name, "gpu_probe.py:env", "--n-trials", "2", "--gpus", "all",
        env={"CUDA_VISIBLE_DEVICES": "GPU-aaaa,GPU-bbbb"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2 worker(s)" in result.stdout
    devices = {t.user_attrs["probe.devices"] for t in load_trials(sqlite_url(tmp_path), study_name)}
    assert devices <= {"GPU-aaaa", "GPU-bbbb"} and devices
    orders = {t.user_attrs["probe.order"] for t in load_trials(sqlite_url(tmp_path), study_name)}
    assert orders == {None}  # the scheduler's entries: not reordered


def test_gpus_are_positions_in_the_inherited_allocation(tmp_path: Path, study_name: str) -> None:
    """Under a scheduler's CUDA_VISIBLE_DEVICES=2,3, ``--gpus 0,1`` is its 2 and 3 (never the
    machine's 0 and 1), without CUDA_DEVICE_ORDER; an index past it is refused."""
    result = _run(
        tmp_path, study_name, "gpu_probe.py:env", "--n-trials", "4", "--gpus", "0,1",
        env={"CUDA_VISIBLE_DEVICES": "2,3"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "GPUs 2 | 3 (1 per worker)" in result.stdout.splitlines()[0]
    trials = load_trials(sqlite_url(tmp_path), study_name)
    for t in trials:
        index = t.user_attrs["probe.worker"].split(".")[0]
        assert t.user_attrs["probe.devices"] == {"0": "2", "1": "3"}[index]
        assert t.user_attrs["probe.order"] is None

    out = tmp_path / "out"
    out.mkdir()
    refused = _run(
        out, study_name, "gpu_probe.py:env", "--gpus", "1,2", env={"CUDA_VISIBLE_DEVICES": "2,3"}
    )
    assert "--gpus: GPU 2 is outside the inherited CUDA_VISIBLE_DEVICES='2,3'" in (
        one_error_line(refused)
    )
    assert list(out.iterdir()) == []  # nothing created


@pytest.mark.parametrize("value", ["", "-1", "NoDevFiles"])
def test_gpus_all_is_refused_when_no_gpu_is_allocated(
    tmp_path: Path, study_name: str, value: str
) -> None:
    result = _run(
        tmp_path, study_name, "gpu_probe.py:env", "--gpus", "all",
        env={"CUDA_VISIBLE_DEVICES": value},
    )  # fmt: skip
    assert f"--gpus: the inherited CUDA_VISIBLE_DEVICES={value!r} allocates no GPU" in (
        one_error_line(result)
    )
    assert list(tmp_path.iterdir()) == []


def test_unicode_digits_are_refused(tmp_path: Path, study_name: str) -> None:
    result = _run(tmp_path, study_name, "gpu_probe.py:env", "--gpus", "\u00b2")
    assert "--gpus: expected GPU indices like 0,1,2,3 or all" in one_error_line(result)


def test_without_gpus_the_environment_is_untouched(tmp_path: Path, study_name: str) -> None:
    result = _run(
        tmp_path, study_name, "gpu_probe.py:env", "--n-trials", "1",
        env={"CUDA_VISIBLE_DEVICES": "3"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "GPUs" not in result.stdout
    (trial,) = load_trials(sqlite_url(tmp_path), study_name)
    assert trial.user_attrs["probe.devices"] == "3"  # inherited, as before
    assert trial.user_attrs["probe.order"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "0,x"], "--gpus: expected GPU indices like 0,1,2,3 or all, got '0,x'"),
        (["--gpus", "1,1"], "--gpus: GPU 1 is listed twice"),
        (["--gpus", "0,1,2", "--gpus-per-worker", "2"],
         "--gpus-per-worker 2: 3 GPU(s) (0,1,2) do not split into groups of 2"),
        (["--gpus", "0", "--gpus-per-worker", "0"], "--gpus-per-worker must be at least 1"),
        (["--gpus-per-worker", "2"], "--gpus-per-worker needs --gpus"),
        (["--max-vram", "0"], "--max-vram: must be positive"),
        (["--max-vram", "150%"], "--max-vram: must be a percentage in (0, 100]"),
        (["--max-vram", "8 parsecs"], "--max-vram: unknown size unit"),
    ],
)
def test_bad_gpu_options(tmp_path: Path, study_name: str, args: list[str], message: str) -> None:
    result = _run(tmp_path, study_name, "gpu_probe.py:env", "--n-trials", "1", *args)
    assert message in one_error_line(result)
    assert not (tmp_path / "optguard.db").exists()  # nothing created
    assert not (tmp_path / "logs").exists()


def test_bad_gpu_option_in_a_config_file(tmp_path: Path, study_name: str) -> None:
    config = tmp_path / "run.toml"
    config.write_text('gpus = "0,0"\nmax_vram = "8GB"\n')
    result = _run(tmp_path, study_name, "gpu_probe.py:env", "--config", str(config))
    assert f"gpus (in {config}): GPU 0 is listed twice" in one_error_line(result)


def test_a_gpu_that_is_not_there_is_refused_when_nvml_can_tell(
    tmp_path: Path, study_name: str
) -> None:
    count = _nvml_count()
    if count is None:
        pytest.skip(f"NVML cannot count the GPUs here: {gpus.nvml_unavailable()}")
    result = _run(tmp_path, study_name, "gpu_probe.py:env", "--gpus", f"0,{count}")
    assert f"--gpus: no GPU {count} on this machine (NVML counts {count}" in one_error_line(result)
    assert not (tmp_path / "optguard.db").exists()


def test_gpus_all_without_nvml_is_refused(
    tmp_path: Path, study_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if _nvml_count() is not None:
        pytest.skip("NVML can count the GPUs here")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    result = _run(tmp_path, study_name, "gpu_probe.py:env", "--gpus", "all")
    line = one_error_line(result)
    assert "--gpus all: cannot count the GPUs: " in line and "--gpus 0,1" in line
    assert not (tmp_path / "optguard.db").exists()


def test_no_torch_and_no_cuda_for_an_objective_without_them(
    tmp_path: Path, study_name: str
) -> None:
    """With GPUs assigned and --max-vram checked at every report: a worker whose objective
    never imports torch never gets it; one that uses torch on the CPU never gets CUDA
    initialized by the guard's checks or the cleanup."""
    _needs_unvalidated(0)
    result = _run(
        tmp_path, study_name, "gpu_probe.py:env", "--n-trials", "3", "--gpus", "0",
        "--max-vram", "50%",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert [t.user_attrs["probe.torch"] for t in trials] == [False] * 3
    assert [t.user_attrs["probe.torch_end"] for t in trials] == [False] * 3
    assert all("optguard.peak_vram_bytes" not in t.user_attrs for t in trials)
    log = log_text(tmp_path)
    assert re.search(r"Worker started: .* gpus=0 max_vram=50%", log)
    assert "final memory" in log and ", GPU " not in log

    pytest.importorskip("torch")
    study = study_name + "t"
    result = _run(
        tmp_path, study, "gpu_probe.py:torch_cpu", "--n-trials", "3", "--gpus", "0",
        "--max-vram", "1GB",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    trials = load_trials(sqlite_url(tmp_path), study)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert [t.user_attrs["probe.cuda_initialized"] for t in trials] == [False] * 3
    for t in trials:  # no attempt either: without a GPU one fails and is_initialized() lies
        assert t.user_attrs["probe.cuda_init_calls_start"] == []
        assert t.user_attrs["probe.cuda_init_calls_end"] == []

    seen = study + "c"  # the probe does see an initialization: the check above can fail
    result = _run(tmp_path, seen, "gpu_probe.py:torch_cuda_init", "--n-trials", "1")
    assert result.returncode == 0, result.stderr
    (trial,) = load_trials(sqlite_url(tmp_path), seen)
    assert trial.user_attrs["probe.cuda_init_calls_end"]


@pytest.mark.parametrize(
    ("fn", "reason", "phrase"),
    [
        ("raises_memory_error", "memory", "Memory exhausted: the objective ran out of memory"),
        ("raises_cuda_oom", "gpu_memory",
         "GPU memory exhausted: the objective ran out of memory"),
    ],
)
def test_out_of_memory_errors_are_recorded_as_the_guard_s_own(
    tmp_path: Path, study_name: str, fn: str, reason: str, phrase: str
) -> None:
    if fn == "raises_cuda_oom":
        pytest.importorskip("torch")
    result = _run(tmp_path, study_name, f"gpu_probe.py:{fn}", "--n-trials", "2", "--fail-fast", "0")
    assert result.returncode == 0, result.stderr  # pruned, not failed
    trials = load_trials(sqlite_url(tmp_path), study_name)
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    for t in trials:
        assert t.user_attrs["optguard.reason"] == reason
        assert t.user_attrs["optguard.enforcement"] == "oom"
        assert t.user_attrs["optguard.pruned_by"] == "guard"
        assert "out of memory" in t.user_attrs["optguard.error"] or "20 GB" in t.user_attrs[
            "optguard.error"
        ]
    log = log_text(tmp_path)
    assert f"Trial #0 pruned: {phrase}" in log
    assert "Trial #0 failed" not in log
    report = run_cli("report", "--study", study_name, "--json", cwd=tmp_path)
    assert f'"{reason}": 2' in report.stdout
    retried = _run(
        tmp_path, study_name, "fast.py:objective", "--n-trials", "2", "--retry-pruned", reason
    )
    assert retried.returncode == 0, retried.stderr
    again = load_trials(sqlite_url(tmp_path), study_name)
    assert [t.user_attrs.get("optguard.retry_of") for t in again[2:]] == [0, 1]
    assert [t.params for t in again[2:]] == [t.params for t in trials]


@pytest.mark.parametrize(
    ("ended", "fails"),
    [
        ([Ended(0, "PRUNED", "MemoryError: x", "oom")] * 3, True),
        ([Ended(0, "PRUNED", "MemoryError: x", "oom")] * 2 + [Ended(2, "FAIL", "MemoryError: x")],
         True),
        ([Ended(0, "PRUNED", None, "check")] * 3, False),  # the guard's own limit: not a failure
        ([Ended(0, "PRUNED", "MemoryError: x", "oom")] * 2 + [Ended(2, "COMPLETE")], False),
    ],
)
def test_fail_fast_counts_out_of_memory_ends(ended: list[Ended], fails: bool) -> None:
    assert (fail_fast_error(ended, 3, "see log") is not None) is fails


def test_fail_fast_stops_a_study_whose_every_trial_runs_out_of_memory(
    tmp_path: Path, study_name: str
) -> None:
    result = _run(tmp_path, study_name, "gpu_probe.py:raises_memory_error", "--n-trials", "20")
    assert result.returncode == 5, result.stderr
    assert "the first 3 trials all failed with: MemoryError: cannot allocate 20 GB" in (
        result.stderr
    )
    assert len(load_trials(sqlite_url(tmp_path), study_name)) < 20


def test_a_memory_error_subclass_of_the_user_s_own_fails_the_trial(
    tmp_path: Path, study_name: str
) -> None:
    """A quota error that derives from MemoryError is the objective's error; numpy's failed
    allocation is an out-of-memory end."""
    result = _run(
        tmp_path, study_name, "gpu_probe.py:raises_quota", "--n-trials", "1", "--fail-fast", "0"
    )
    assert result.returncode == 0, result.stderr
    (trial,) = load_trials(sqlite_url(tmp_path), study_name)
    assert trial.state == TrialState.FAIL
    assert "optguard.reason" not in trial.user_attrs
    assert "QuotaExceeded: API quota exceeded" in trial.user_attrs["optguard.error"]

    pytest.importorskip("numpy")
    study = study_name + "n"
    result = _run(tmp_path, study, "gpu_probe.py:numpy_oom", "--n-trials", "1", "--fail-fast", "0")
    assert result.returncode == 0, result.stderr
    (trial,) = load_trials(sqlite_url(tmp_path), study)
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["optguard.reason"] == "memory"
    assert trial.user_attrs["optguard.enforcement"] == "oom"


def test_reports_say_ran_out_of_memory_not_over_the_limit(tmp_path: Path, study_name: str) -> None:
    """An out-of-memory end crossed no limit: neither report may say it went over one."""
    result = _run(
        tmp_path, study_name, "gpu_probe.py:raises_memory_error", "--n-trials", "2",
        "--fail-fast", "0", "--max-rss", "12GB",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    page = tmp_path / "r.html"
    report = run_cli("report", "--study", study_name, "--html", str(page), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    html = page.read_text()
    assert "ran out of memory (the objective&#x27;s allocation failed)" in html or (
        "ran out of memory (the objective's allocation failed)" in html
    )
    assert "went over the memory limit" not in html
    assert "ran out of memory (recorded by the guard)" in html
    assert "memory (2 ran out of memory)" in report.stdout


@pytest.mark.parametrize(
    ("point", "words"),
    [
        ({"reason": "gpu_memory", "peak_vram_mb": 2100.0},
         "went over the GPU memory limit of 2 GB, and the guard ended it (state pruned): "
         '<a href="#trial-0">#0</a>. Peak GPU memory reached up to 2.1 GB.'),
        ({"reason": "gpu_memory", "enforcement": "oom"}, "ran out of GPU memory"),
        ({"reason": "memory", "enforcement": "oom"}, "ran out of memory"),
        ({"reason": "memory", "enforcement": "check"}, "went over the memory limit of 12 GB"),
    ],
)
def test_html_guard_sentences_for_gpu_memory_and_oom(point: dict[str, object], words: str) -> None:
    from optguard.report_html import OUTCOMES, _guard_sentences, outcome

    p = {"trial": 0, "state": "PRUNED", "duration_s": 1.0, "peak_mb": 10.0, **point}
    report = {"points": [p], "limits": {"max_vram_bytes": 2 * GB}, "hard_kills": 0}
    (sentence, *_) = _guard_sentences(report, 12000.0, None)
    assert words in sentence
    assert outcome(p) in OUTCOMES and outcome(p) != "other_reason"


FAKES = Path(__file__).parent / "fakes"  # pynvml standing in for a GPU this machine lacks


def _fake_nvml_env(**extra: str) -> dict[str, str]:
    import os

    path = os.pathsep.join(filter(None, [str(FAKES), os.environ.get("PYTHONPATH", "")]))
    return {"PYTHONPATH": path, **extra}


def test_the_supervisor_enforces_max_vram_from_outside(tmp_path: Path, study_name: str) -> None:
    """An objective that never reports is still ended on GPU memory: by the supervisor, from
    NVML's per-process figures (here the fake NVML's)."""
    result = _run(
        tmp_path, study_name, "gpu_probe.py:holds_memory", "--n-trials", "1", "--gpus", "0",
        "--max-vram", "600MB", "--max-rss", "8GB", "--timeout", "60",
        env=_fake_nvml_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (trial,) = load_trials(sqlite_url(tmp_path), study_name)
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["optguard.reason"] == "gpu_memory"
    assert trial.user_attrs["optguard.enforcement"] in ("interrupt", "hard_kill")
    assert trial.user_attrs["optguard.limit_bytes"] == 600 * MB
    assert trial.user_attrs["optguard.peak_vram_bytes"] > 600 * MB
    phrase = r"GPU memory limit exceeded: [\d.]+ ?[MG]B \(limit 600 ?MB\)"
    assert re.search(phrase, log_text(tmp_path))


@pytest.mark.parametrize(
    ("limits", "why", "words"),
    [
        (Limits(max_vram_bytes=GB), "NVML unavailable (no driver)",
         "not enforced from outside the workers: NVML unavailable (no driver)"),
        (Limits(max_vram_percent=50.0), "nvidia-ml-py not installed",
         "and 50% only once torch knows the GPUs' totals"),
        (Limits(max_vram_bytes=GB), "", None),  # NVML watches
        (Limits(), "NVML unavailable (no driver)", None),  # nothing to watch
    ],
)
def test_unwatched_warning(limits: Limits, why: str, words: str | None) -> None:
    warning = gpus.unwatched_warning(limits, why)
    assert warning is None if words is None else words in str(warning)


def test_max_vram_unwatched_is_said_at_start(
    tmp_path: Path, study_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if _nvml_count() is not None:
        pytest.skip("NVML can watch here")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    result = _run(
        tmp_path, study_name, "gpu_probe.py:env", "--n-trials", "1", "--max-vram", "1GB"
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if "--max-vram" in line]
    assert len(warnings) == 1, result.stdout
    assert warnings[0].startswith(
        f"optguard: warning: --max-vram is not enforced from outside the workers: "
        f"{gpus.nvml_unavailable()}"
    )
    assert re.search(r"WARNING .*--max-vram is not enforced from outside", log_text(tmp_path))


def test_a_percent_nvml_cannot_resolve_is_refused(tmp_path: Path, study_name: str) -> None:
    """NVML is there (the fake) but does not know the inherited UUID: 50% of nothing."""
    result = _run(
        tmp_path, study_name, "gpu_probe.py:env", "--gpus", "all", "--max-vram", "50%",
        env=_fake_nvml_env(CUDA_VISIBLE_DEVICES="GPU-aaaa"),
    )  # fmt: skip
    assert "--max-vram 50%: NVML does not know the memory of the GPUs (GPU-aaaa)" in (
        one_error_line(result)
    )
    assert not (tmp_path / "optguard.db").exists() and not (tmp_path / "logs").exists()


def test_visible_totals_without_nvml_creates_no_cuda_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch's device properties, not ``mem_get_info`` (a context on every device)."""

    class _Cuda:
        def is_initialized(self) -> bool:
            return True

        def device_count(self) -> int:
            return 2

        def get_device_properties(self, device: int) -> object:
            return _Mod(total_memory=(device + 1) * GB)

        def mem_get_info(self, device: int) -> tuple[int, int]:
            raise AssertionError(f"a CUDA context created on device {device}")

    monkeypatch.setattr(gpus, "nvml", lambda: None)
    monkeypatch.setitem(__import__("sys").modules, "torch", _Mod(cuda=_Cuda()))
    assert gpus.visible_totals() == [GB, 2 * GB]


def test_the_worker_command_ignores_gpus_in_a_config_file(tmp_path: Path, study_name: str) -> None:
    """``gpus`` is shared out by ``run``: a lone worker says it ignores it, then works."""
    config = tmp_path / "run.toml"
    config.write_text('gpus = "all"\ngpus_per_worker = 2\n')
    optuna.create_study(study_name=study_name, storage=sqlite_url(tmp_path))
    result = run_cli(
        "worker", "--study", study_name, "--objective", objective("gpu_probe.py:env"),
        "--storage", sqlite_url(tmp_path), "--n-trials", "1", "--config", str(config),
        cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": "GPU-aaaa"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        f"optguard: warning: gpus, gpus_per_worker (in {config}) applies to `optguard run` only"
        in result.stderr
    )
    (trial,) = load_trials(sqlite_url(tmp_path), study_name)
    assert trial.state == TrialState.COMPLETE
    assert trial.user_attrs["probe.devices"] == "GPU-aaaa"  # its own, untouched


# -- with a GPU ---------------------------------------------------------------------------------
def test_gpu_limit_prunes_a_leaking_trial(tmp_path: Path, study_name: str) -> None:
    count = _nvml_count()
    if not count:
        pytest.skip(f"no GPU that NVML finds: {gpus.nvml_unavailable() or 'it counts none'}")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    result = _run(
        tmp_path, study_name, "gpu_probe.py:leaks_gpu", "--n-trials", "1", "--gpus", "0",
        "--max-vram", "2GB", "--timeout", "60",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (trial,) = load_trials(sqlite_url(tmp_path), study_name)
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["optguard.reason"] == "gpu_memory"
    assert trial.user_attrs["optguard.limit_bytes"] == 2e9
    assert trial.user_attrs["optguard.peak_vram_bytes"] > 2e9
    log = log_text(tmp_path)
    assert re.search(r"GPU memory limit exceeded: \d+(\.\d+)?GB \(limit 2GB\)", log)
    assert re.search(r"Trial #0 final memory: [\d.]+GB, GPU [\d.]+GB", log)
