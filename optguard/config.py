"""Options of ``optguard run``/``worker``: from a TOML file, overridden by flags, validated once."""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from optguard.artifacts import CHECKPOINT_STORES
from optguard.checkpointing import DEFAULT_ROOT as DEFAULT_CHECKPOINT_DIR
from optguard.early_stopping import patience_error
from optguard.errors import ConfigError, UsageError
from optguard.gpus import group_devices, parse_vram, resolve_gpus
from optguard.limits import (
    DEFAULT_MAX_RSS,
    DEFAULT_TIMEOUT_S,
    Escalation,
    Limits,
    parse_duration,
    parse_percent,
    parse_ratio,
    parse_size,
)
from optguard.study import SAMPLERS, parse_directions, parse_pruner, sampler_error
from optguard.termination import terminate_error

__all__ = ["RunOptions", "resolve_options", "CONFIG_KEYS"]

# key -> accepted TOML types (bool, a subclass of int, only where listed).
CONFIG_KEYS: dict[str, tuple[type, ...]] = {
    "study": (str,),
    "objective": (str,),
    "storage": (str,),
    "workers": (int,),
    "n_trials": (int,),
    "timeout": (str, int, float),
    "max_rss": (str, int),
    "direction": (str,),
    "directions": (str, list),
    "sampler": (str,),
    "pruner": (str,),
    "log_dir": (str,),
    "grace": (str, int, float),
    "memory_grace": (str, int, float),
    "kill_after": (str, int, float),
    "memory_ceiling": (int, float),
    "max_system_ram": (int, float, str),
    "max_trials_per_worker": (int,),
    "recycle_rss": (str, int),
    "tag": (str,),
    "retry_pruned": (str, list),
    "patience": (int,),
    "terminate": (bool,),
    "heartbeat": (str, int, float),
    "min_delta": (int, float),
    "checkpoint_dir": (str,),
    "checkpoint_budget": (str, int, float),
    "checkpoint_store": (str,),
    "artifacts": (str,),
    "artifacts_all": (bool,),
    "start_timeout": (str, int, float),
    "fail_fast": (int,),
    "storage_outage": (str, int, float),
    "threads_per_worker": (int,),
    "cpu_affinity": (bool,),
    "keep_pools": (bool,),
    "gateway": (bool,),
    "seed": (int,),
    "gpus": (str, list, int),
    "gpus_per_worker": (int,),
    "max_vram": (str, int),
}
RETRY_REASONS = ("timeout", "memory", "system_memory", "worker_died", "gpu_memory")
DIRECTION_KEYS = ("direction", "directions")


@dataclass(frozen=True)
class RunOptions:
    """Everything a supervisor or a worker needs to run a study."""

    study: str
    objective: str
    storage: str | None = None
    workers: int = 1
    n_trials: int | None = None
    limits: Limits = Limits()
    # One per objective; () = not given: an existing study's own, minimize for a new one
    # (``study.resolve_directions``, once the storage is open).
    directions: tuple[str, ...] = ()
    sampler: str = "tpe"
    pruner: str = "median"
    log_dir: Path = Path("logs")
    escalation: Escalation = Escalation()
    max_trials_per_worker: int | None = None
    recycle_rss: int | None = None
    tag: str | None = None
    retry_pruned: tuple[str, ...] = ()
    patience: int | None = None
    terminate: bool = False  # the supervisor evaluates optuna.terminator (optguard.termination)
    heartbeat_s: float = 30.0
    min_delta: float = 0.0
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR
    checkpoint_budget_s: float = 10.0  # emergency checkpoint callbacks, after an interrupt
    checkpoint_store: str = "local"  # or "artifacts": checkpoints any host can resume from
    artifacts: str | None = None  # the artifact store's directory, "none", None: the default
    artifacts_all: bool = False  # evidence for every trial, not only those the guard ended
    start_timeout_s: float = 600.0  # a worker not ready by then (its import hangs) ends the run
    fail_fast: int = 3  # the run's first N trials all failing with one error end it; 0: never
    storage_outage_s: float = 60.0  # storage unreachable this long: give up (exit 3)
    threads_per_worker: int | None = None  # None: the cores available / workers (threads.py)
    cpu_affinity: bool = False  # pin each worker to its own threads_per_worker cores
    keep_pools: bool = True  # idle pool workers a trial leaves survive it (optguard.leftovers)
    gateway: bool = True  # on a database server, workers' calls go through the supervisor
    seed: int | None = None  # each worker's sampler gets study.worker_seed(seed, ...)
    gpus: tuple[str, ...] = ()  # --gpus: CUDA_VISIBLE_DEVICES entries shared out (gpus.py)
    gpus_per_worker: int = 1

    def with_storage(self, url: str) -> "RunOptions":
        return replace(self, storage=url)


def load_config(path: Path) -> dict[str, Any]:
    """Read a TOML config file; unknown keys and wrong types are errors, not surprises."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for key, value in data.items():
        if key not in CONFIG_KEYS:
            known = ", ".join(CONFIG_KEYS)
            raise ConfigError(f"config file {path}: unknown key {key!r} (known: {known})")
        types = CONFIG_KEYS[key]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            wanted = " or ".join(t.__name__ for t in types)
            raise ConfigError(
                f"config file {path}: {key} must be {wanted}, got {type(value).__name__}"
            )
    return data


def _option_name(key: str, from_config: bool, config: Path | None) -> str:
    return f"{key} (in {config})" if from_config else "--" + key.replace("_", "-")


RUN_ONLY_KEYS = ("gpus", "gpus_per_worker")  # shared out by `run`; a lone worker has its own


def resolve_options(
    flags: Mapping[str, Any], config: Path | None = None, ignore: Iterable[str] = ()
) -> RunOptions:
    """Merge a config file with flags (flags win; ``None`` means not given) and validate.
    The file's ``ignore`` keys are dropped (``optguard worker``: ``RUN_ONLY_KEYS``)."""
    file_values = load_config(config) if config is not None else {}
    for key in ignore:
        file_values.pop(key, None)
    merged: dict[str, Any] = dict(file_values)
    if any(flags.get(key) is not None for key in DIRECTION_KEYS):
        for key in DIRECTION_KEYS:  # a flag replaces the file's directions, in either form
            merged.pop(key, None)
    merged.update({k: v for k, v in flags.items() if v is not None})

    def name(key: str) -> str:
        return _option_name(key, key in file_values and flags.get(key) is None, config)

    for key in ("study", "objective"):
        value = merged.get(key)
        if not isinstance(value, str) or not value.strip():
            raise UsageError(f"missing required option {_option_name(key, False, None)}")
    fail_fast = merged.get("fail_fast", 3)
    if fail_fast < 0:
        raise UsageError(f"{name('fail_fast')} must be >= 0, got {fail_fast}")
    for key in ("workers", "n_trials", "max_trials_per_worker", "patience",
                "threads_per_worker"):
        value = merged.get(key)
        if value is not None and value < 1:
            raise UsageError(f"{name(key)} must be at least 1, got {value}")
    sampler = merged.get("sampler")
    if sampler is not None and sampler not in SAMPLERS:
        raise UsageError(f"{name('sampler')} must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    pruner = merged.get("pruner")
    pruner = None if pruner is None else parse_pruner(pruner, name("pruner")).text
    directions = _directions(merged, name)
    seed = merged.get("seed")
    if seed is not None and seed < 0:
        raise UsageError(f"{name('seed')} must be >= 0, got {seed}")
    # A new multi-objective study is refused here, before the storage is touched; an existing
    # one's directions are only known once it is open (supervision.prepare_study).
    refused = (
        patience_error(merged.get("patience"), len(directions))
        or terminate_error(merged.get("terminate"), len(directions))
        or sampler_error(merged.get("sampler", "tpe"), len(directions), name("sampler"))
    )
    if refused is not None:
        raise UsageError(refused)

    timeout = merged.get("timeout")
    max_rss = merged.get("max_rss")
    max_vram = merged.get("max_vram")
    vram_bytes, vram_percent = (None, None) if max_vram is None else parse_vram(
        max_vram, name("max_vram")
    )
    limits = Limits(
        timeout_s=DEFAULT_TIMEOUT_S if timeout is None else parse_duration(timeout, name("timeout")),
        max_rss_bytes=DEFAULT_MAX_RSS if max_rss is None else parse_size(max_rss, name("max_rss")),
        max_vram_bytes=vram_bytes,
        max_vram_percent=vram_percent,
    )
    gpu_devices, per_worker, workers = _gpus(merged, name)
    def parsed(key: str, parse: Any, default: Any) -> Any:
        value = merged.get(key)
        return default if value is None else parse(value, name(key))

    base = Escalation()
    escalation = Escalation(
        grace_s=parsed("grace", parse_duration, base.grace_s),
        memory_grace_s=parsed(
            "memory_grace", functools.partial(parse_duration, allow_zero=True),
            base.memory_grace_s,
        ),  # fmt: skip
        kill_after_s=parsed("kill_after", parse_duration, base.kill_after_s),
        memory_ceiling=parsed("memory_ceiling", parse_ratio, base.memory_ceiling),
        max_system_ram_pct=parsed("max_system_ram", parse_percent, base.max_system_ram_pct),
    )
    retry = merged.get("retry_pruned") or ()
    if isinstance(retry, str):
        retry = [r.strip() for r in retry.split(",") if r.strip()]
    for reason in retry:
        if reason not in RETRY_REASONS:
            raise UsageError(
                f"{name('retry_pruned')}: unknown reason {reason!r} "
                f"(use {', '.join(RETRY_REASONS)})"
            )
    store = merged.get("checkpoint_store", "local")
    if store not in CHECKPOINT_STORES:
        raise UsageError(
            f"{name('checkpoint_store')} must be one of {', '.join(CHECKPOINT_STORES)}, "
            f"got {store!r}"
        )
    artifacts = merged.get("artifacts")
    if artifacts is not None and not str(artifacts).strip():
        raise UsageError(f"{name('artifacts')} must be a directory or none, got {artifacts!r}")
    no_store = artifacts is not None and str(artifacts).strip().lower() == "none"
    if store == "artifacts" and no_store:
        raise UsageError(
            f"{name('checkpoint_store')} artifacts needs an artifact store, but "
            f"{name('artifacts')} is none"
        )
    if merged.get("artifacts_all") and no_store:
        raise UsageError(
            f"{name('artifacts_all')} needs an artifact store, but {name('artifacts')} is none"
        )
    min_delta = merged.get("min_delta", 0.0)
    if min_delta < 0:
        raise UsageError(f"{name('min_delta')} must be >= 0, got {min_delta}")
    defaults = RunOptions(study="", objective="")
    return RunOptions(
        study=merged["study"],
        objective=merged["objective"],
        storage=merged.get("storage"),
        workers=workers,
        n_trials=merged.get("n_trials"),
        limits=limits,
        directions=directions,
        sampler=merged.get("sampler", defaults.sampler),
        pruner=pruner or defaults.pruner,
        log_dir=Path(merged.get("log_dir", defaults.log_dir)),
        escalation=escalation,
        max_trials_per_worker=merged.get("max_trials_per_worker"),
        recycle_rss=parsed("recycle_rss", parse_size, None),
        tag=merged.get("tag"),
        retry_pruned=tuple(retry),
        patience=merged.get("patience"),
        terminate=bool(merged.get("terminate", defaults.terminate)),
        heartbeat_s=parsed("heartbeat", parse_duration, defaults.heartbeat_s),
        min_delta=float(min_delta),
        checkpoint_dir=Path(merged.get("checkpoint_dir", defaults.checkpoint_dir)),
        checkpoint_budget_s=parsed(
            "checkpoint_budget", parse_duration, defaults.checkpoint_budget_s
        ),
        checkpoint_store=store,
        artifacts=artifacts,
        artifacts_all=bool(merged.get("artifacts_all", defaults.artifacts_all)),
        start_timeout_s=parsed("start_timeout", parse_duration, defaults.start_timeout_s),
        fail_fast=fail_fast,
        storage_outage_s=parsed("storage_outage", parse_duration, defaults.storage_outage_s),
        threads_per_worker=merged.get("threads_per_worker"),
        cpu_affinity=bool(merged.get("cpu_affinity", defaults.cpu_affinity)),
        keep_pools=bool(merged.get("keep_pools", defaults.keep_pools)),
        gateway=bool(merged.get("gateway", defaults.gateway)),
        seed=seed,
        gpus=gpu_devices,
        gpus_per_worker=per_worker,
    )


def _gpus(merged: Mapping[str, Any], name: Any) -> tuple[tuple[str, ...], int, int]:
    """``(devices, per worker, workers)``: ``--workers`` defaults to the number of GPU groups
    when ``--gpus`` is given. NVML is asked only then (a GPU index not there: exit 2)."""
    workers = merged.get("workers", RunOptions.workers)
    per_worker = merged.get("gpus_per_worker")
    if merged.get("gpus") is None:
        if per_worker is not None:
            raise UsageError(f"{name('gpus_per_worker')} needs {name('gpus')}")
        return (), 1, workers
    devices = resolve_gpus(merged["gpus"], name("gpus"))
    groups = group_devices(devices, 1 if per_worker is None else per_worker,
                           name("gpus_per_worker"))  # fmt: skip
    return devices, len(groups[0]), merged.get("workers", len(groups))


def _directions(merged: Mapping[str, Any], name: Any) -> tuple[str, ...]:
    """``direction`` (a string, or a list from a repeated ``--direction``) or ``directions``
    (a list or a comma string): one of them, parsed."""
    given = [key for key in DIRECTION_KEYS if merged.get(key) is not None]
    if len(given) > 1:
        raise UsageError(f"{name('direction')} and {name('directions')}: give only one")
    if not given:
        return ()
    value = merged[given[0]]
    values = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(v, str) for v in values):
        raise UsageError(f"{name(given[0])} must be a list of strings")
    directions = parse_directions(values, name(given[0]))
    if not directions:
        raise UsageError(f"{name(given[0])} is empty")
    return directions
