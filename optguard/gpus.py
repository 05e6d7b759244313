"""GPUs per worker and GPU memory per trial (``--gpus``, ``--gpus-per-worker``, ``--max-vram``).

Each worker gets its own ``CUDA_VISIBLE_DEVICES`` in its environment before it starts: CUDA
reads it once, at its first call, so the environment is the one place early enough (as for
the thread variables). ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` goes with it, so that index i is
NVML's GPU i, not CUDA's "fastest first" ordering.

GPU memory is read from NVML (``pip install 'optguard[gpu]'``, module ``pynvml``): per
process, without creating a CUDA context, so the supervisor can watch a worker's whole tree.
Inside a worker torch's own counters are the fallback, read only when the objective already
imported torch and initialized CUDA: nothing here imports torch or initializes CUDA. NVML
absent or unusable (no driver) means "unknown", never an error, except where a choice needs
it (``--gpus all`` with nothing to count).

The parsing, grouping and assignment functions are pure, for table tests.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

from optguard.errors import UsageError
from optguard.limits import format_against, parse_percent, parse_size

__all__ = [
    "CUDA_ENV",
    "ORDER_ENV",
    "REASON_GPU_MEMORY",
    "Nvml",
    "assign_devices",
    "describe_groups",
    "gpu_env",
    "group_devices",
    "nvml",
    "oom_reason",
    "parse_gpus",
    "parse_vram",
    "resolve_gpus",
    "resolve_vram_limit",
    "run_groups",
]

CUDA_ENV = "CUDA_VISIBLE_DEVICES"
ORDER_ENV = "CUDA_DEVICE_ORDER"
REASON_GPU_MEMORY = "gpu_memory"
GPUS_ALL = "all"
PROCESS_CACHE_S = 0.01  # per-process usage read at most this often (one query per GPU)


# -- pure: parsing, grouping, assignment ----------------------------------------------------
def parse_gpus(value: str | int | Sequence[Any], option: str = "--gpus") -> tuple[str, ...] | None:
    """``0,1,2,3`` (or a TOML list, or one int) as device indices; ``None`` for ``all``."""
    if isinstance(value, bool):
        raise UsageError(f"{option}: expected GPU indices like 0,1 or all, got {value!r}")
    if isinstance(value, int):
        items: list[Any] = [value]
    elif isinstance(value, str):
        if value.strip().lower() == GPUS_ALL:
            return None
        items = [part.strip() for part in value.split(",")]
    else:
        items = list(value)
    indices: list[str] = []
    for item in items:
        text = str(item).strip()
        if isinstance(item, bool) or not text.isdigit():
            raise UsageError(
                f"{option}: expected GPU indices like 0,1,2,3 or all, got {value!r}"
            )
        if str(int(text)) in indices:
            raise UsageError(f"{option}: GPU {int(text)} is listed twice in {value!r}")
        indices.append(str(int(text)))
    if not indices:
        raise UsageError(f"{option}: expected GPU indices like 0,1,2,3 or all, got {value!r}")
    return tuple(indices)


def group_devices(
    devices: Sequence[str], per_worker: int, option: str = "--gpus-per-worker"
) -> tuple[tuple[str, ...], ...]:
    """``devices`` in consecutive groups of ``per_worker``: group i is worker i's."""
    if per_worker < 1:
        raise UsageError(f"{option} must be at least 1, got {per_worker}")
    if per_worker > len(devices) or len(devices) % per_worker:
        raise UsageError(
            f"{option} {per_worker}: {len(devices)} GPU(s) ({','.join(devices)}) do not split "
            f"into groups of {per_worker}"
        )
    return tuple(
        tuple(devices[i : i + per_worker]) for i in range(0, len(devices), per_worker)
    )


def run_groups(devices: Sequence[str], per_worker: int) -> tuple[tuple[str, ...], ...]:
    """The groups of a run's ``--gpus`` (none without it)."""
    return group_devices(devices, per_worker) if devices else ()


def assign_devices(groups: Sequence[Sequence[str]], index: int) -> tuple[str, ...]:
    """Worker ``index``'s GPUs: group ``index``, wrapping round when there are more workers
    than groups. A replacement keeps its predecessor's index, so it gets the same GPUs."""
    if not groups:
        return ()
    return tuple(groups[index % len(groups)])


def gpu_env(devices: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """What a worker on ``devices`` gets in its environment (nothing without ``--gpus``).

    ``CUDA_DEVICE_ORDER`` the user set is kept: then their order is the one indices mean.
    """
    if not devices:
        return {}
    env = {CUDA_ENV: ",".join(devices)}
    if not environ.get(ORDER_ENV, "").strip():
        env[ORDER_ENV] = "PCI_BUS_ID"
    return env


def describe_groups(groups: Sequence[Sequence[str]], workers: int) -> str:
    """``GPUs 0,1 | 2,3 (2 per worker)``, for the run's first line."""
    if not groups:
        return ""
    text = f"GPUs {' | '.join(','.join(g) for g in groups)} ({len(groups[0])} per worker"
    if workers > len(groups):
        text += f", {workers} workers share {len(groups)} group(s)"
    return text + ")"


def parse_vram(value: str | int, option: str = "--max-vram") -> tuple[int | None, float | None]:
    """``(bytes, None)`` for a size (``8GB``), ``(None, percent)`` for ``90%``: the percent
    is of the total memory of the worker's GPUs, known only where they are."""
    if isinstance(value, str) and value.strip().endswith("%"):
        return None, parse_percent(value, option)
    return parse_size(value, option), None


def percent_of(percent: float, totals: Iterable[int]) -> int | None:
    """``percent`` of the summed ``totals`` in bytes; ``None`` when no total is known."""
    total = sum(totals)
    return int(total * percent / 100) if total > 0 else None


def oom_reason(exc: BaseException) -> str | None:
    """``gpu_memory`` for torch's CUDA out-of-memory error, ``memory`` for a ``MemoryError``,
    else ``None``. torch is looked up, never imported: an objective that raised its error
    has imported it already."""
    if isinstance(exc, MemoryError):
        return "memory"
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(
        getattr(torch, "cuda", None), "OutOfMemoryError", None
    )
    if isinstance(oom, type) and isinstance(exc, oom):
        return REASON_GPU_MEMORY
    return None


# -- NVML: lazily loaded, absent = unknown --------------------------------------------------
class Nvml:
    """NVML once initialized; ``None`` answers where it cannot tell."""

    def __init__(self, module: Any) -> None:
        self.pynvml = module
        count = module.nvmlDeviceGetCount()
        self.handles = [module.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        self._usage: dict[int, int] = {}
        self._usage_at = -1.0

    def count(self) -> int:
        return len(self.handles)

    def handle(self, device: str) -> Any:
        """The NVML handle of one ``CUDA_VISIBLE_DEVICES`` entry (an index or a UUID)."""
        pynvml = self.pynvml
        try:
            if device.isdigit():
                return self.handles[int(device)] if int(device) < len(self.handles) else None
            return pynvml.nvmlDeviceGetHandleByUUID(device)
        except pynvml.NVMLError:
            return None  # a MIG or unknown id: its memory is not counted

    def totals(self, devices: Sequence[str] | None) -> list[int]:
        """Total memory of ``devices`` (every GPU for ``None``)."""
        handles = self.handles if devices is None else [self.handle(d) for d in devices]
        totals = []
        for handle in handles:
            if handle is None:
                continue
            try:
                totals.append(int(self.pynvml.nvmlDeviceGetMemoryInfo(handle).total))
            except self.pynvml.NVMLError:
                continue  # a GPU that fell off the bus: not counted
        return totals

    def process_memory(self) -> dict[int, int]:
        """pid -> GPU memory used, summed over every GPU (cached ``PROCESS_CACHE_S``)."""
        now = time.monotonic()
        if now - self._usage_at < PROCESS_CACHE_S:
            return self._usage
        pynvml = self.pynvml
        usage: dict[int, int] = {}
        for handle in self.handles:
            seen: set[int] = set()
            for query in (
                pynvml.nvmlDeviceGetComputeRunningProcesses,
                pynvml.nvmlDeviceGetGraphicsRunningProcesses,
            ):
                try:
                    procs = query(handle)
                except pynvml.NVMLError:
                    continue  # not supported on this GPU, or it is gone: counted as none
                for proc in procs:
                    used = getattr(proc, "usedGpuMemory", None)
                    if proc.pid in seen or not isinstance(used, int):
                        continue  # listed as compute and graphics, or no figure (MIG, WDDM)
                    seen.add(proc.pid)
                    usage[proc.pid] = usage.get(proc.pid, 0) + used
        self._usage, self._usage_at = usage, now
        return usage

    def memory_of(self, pids: Iterable[int]) -> int:
        """GPU memory of these processes. NVML names pids as the host sees them: inside a
        container with its own pid namespace nothing matches (0)."""
        usage = self.process_memory()
        return sum(usage.get(pid, 0) for pid in set(pids))


_nvml: Nvml | None = None
_nvml_why: str | None = None


def nvml() -> Nvml | None:
    """NVML, initialized on first use; ``None`` when nvidia-ml-py is absent or NVML cannot
    start (no driver): ``nvml_unavailable()`` says why."""
    global _nvml, _nvml_why
    if _nvml is not None or _nvml_why is not None:
        return _nvml
    if importlib.util.find_spec("pynvml") is None:
        _nvml_why = "nvidia-ml-py not installed (pip install 'optguard[gpu]')"
        return None
    module = importlib.import_module("pynvml")
    try:
        module.nvmlInit()
        _nvml = Nvml(module)
    except module.NVMLError as exc:
        _nvml_why = f"NVML unavailable ({exc})"
    return _nvml


def nvml_unavailable() -> str:
    """Why ``nvml()`` is ``None`` (empty when it is not)."""
    return "" if nvml() is not None else str(_nvml_why)


def resolve_gpus(value: str | int | Sequence[Any], option: str = "--gpus") -> tuple[str, ...]:
    """The devices ``--gpus`` names, checked against the GPUs NVML counts when it can.

    ``all``: the supervisor's own ``CUDA_VISIBLE_DEVICES`` when set (a scheduler's share,
    UUIDs included), else every GPU NVML counts; an error when neither can tell.
    """
    indices = parse_gpus(value, option)
    lib = nvml()
    if indices is None:
        inherited = [d.strip() for d in os.environ.get(CUDA_ENV, "").split(",") if d.strip()]
        if inherited:
            return tuple(inherited)
        if lib is None:
            raise UsageError(
                f"{option} all: cannot count the GPUs: {nvml_unavailable()}; list them "
                f"instead ({option} 0,1)"
            )
        if lib.count() == 0:
            raise UsageError(f"{option} all: NVML found no GPU on this machine")
        return tuple(str(i) for i in range(lib.count()))
    if lib is not None:
        missing = [i for i in indices if int(i) >= lib.count()]
        if missing:
            have = f"0-{lib.count() - 1}" if lib.count() else "none"
            raise UsageError(
                f"{option}: no GPU {','.join(missing)} on this machine (NVML counts "
                f"{lib.count()}: {have})"
            )
    return indices


# -- inside a worker: this process's GPU memory -----------------------------------------------
def _cuda_in_use() -> Any:
    """torch.cuda when the objective imported torch and initialized CUDA, else ``None``:
    never imports torch, never initializes CUDA."""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is None:
        return None
    try:
        return cuda if cuda.is_initialized() else None
    except (AttributeError, RuntimeError):
        return None  # a partial or broken torch: as if CUDA were unused


def torch_reserved(peak: bool = False) -> int | None:
    """Memory torch's caching allocator holds on every device (its peak since the trial
    began with ``peak``); ``None`` when CUDA is not in use."""
    cuda = _cuda_in_use()
    if cuda is None:
        return None
    read = cuda.max_memory_reserved if peak else cuda.memory_reserved
    try:
        return sum(int(read(d)) for d in range(cuda.device_count()))
    except RuntimeError:
        return None  # the device is in a bad state: unknown


def reset_torch_peak() -> None:
    """Start a new peak of torch's counters for the trial (only when CUDA is in use)."""
    cuda = _cuda_in_use()
    if cuda is None:
        return
    try:
        for device in range(cuda.device_count()):
            cuda.reset_peak_memory_stats(device)
    except RuntimeError:
        pass  # the device is in a bad state: the peak is the lifetime one


def own_gpu_memory(with_nvml: bool = True) -> int | None:
    """This process's GPU memory: NVML's figure (the CUDA context included) or torch's
    counters, the larger; ``None`` when neither can tell (no NVML, CUDA not in use)."""
    figures = []
    lib = nvml() if with_nvml else _nvml
    if lib is not None:
        own = lib.process_memory().get(os.getpid())
        if own is not None:
            figures.append(own)
    reserved = torch_reserved()
    if reserved is not None:
        figures.append(reserved)
    return max(figures) if figures else None


def visible_totals() -> list[int]:
    """Total memory of this process's GPUs (its ``CUDA_VISIBLE_DEVICES``, else all): NVML,
    else torch once CUDA is in use; empty when unknown."""
    lib = nvml()
    if lib is not None:
        entries = [d.strip() for d in os.environ.get(CUDA_ENV, "").split(",") if d.strip()]
        totals = lib.totals(entries if CUDA_ENV in os.environ else None)
        if totals:
            return totals
    cuda = _cuda_in_use()
    if cuda is None:
        return []
    try:
        return [int(cuda.mem_get_info(d)[1]) for d in range(cuda.device_count())]
    except RuntimeError:
        return []  # the device is in a bad state: unknown


def worker_summary(environ: Mapping[str, str], limits: Any) -> str:
    """For a worker's "Worker started:" line: `` gpus=0,1`` when it has a
    ``CUDA_VISIBLE_DEVICES``, `` max_vram=8GB`` (or ``90%``) with ``--max-vram``."""
    devices = environ.get(CUDA_ENV)
    text = "" if devices is None else f" gpus={devices or '(none)'}"
    if limits.max_vram_percent is not None:
        text += f" max_vram={limits.max_vram_percent:g}%"
    elif limits.max_vram_bytes is not None:
        limit = limits.max_vram_bytes
        text += f" max_vram={format_against(limit, limit, 'size')[1]}"
    return text


def resolve_vram_limit(limits: Any, groups: Sequence[Sequence[str]]) -> Any:
    """``limits`` with a ``--max-vram`` percent turned into bytes where NVML can tell: of the
    smallest group's total (every worker then has the same limit), or, without ``--gpus``,
    of the GPUs this process sees. Unchanged when it cannot: the workers resolve it."""
    from dataclasses import replace

    lib = nvml()
    if limits.max_vram_percent is None or lib is None:
        return limits
    if groups:
        sums = [sum(lib.totals(list(g))) for g in groups]
    else:
        inherited = [d.strip() for d in os.environ.get(CUDA_ENV, "").split(",") if d.strip()]
        sums = [sum(lib.totals(inherited if CUDA_ENV in os.environ else None))]
    limit = percent_of(limits.max_vram_percent, [min(sums)]) if sums else None
    if limit is None:
        return limits
    return replace(limits, max_vram_bytes=limit, max_vram_percent=None)
