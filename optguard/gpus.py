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
    "inherited_devices",
    "nvml",
    "oom_reason",
    "parse_gpus",
    "parse_vram",
    "resolve_gpus",
    "resolve_vram_limit",
    "run_groups",
    "unwatched_warning",
    "within_inherited",
]

CUDA_ENV = "CUDA_VISIBLE_DEVICES"
ORDER_ENV = "CUDA_DEVICE_ORDER"
REASON_GPU_MEMORY = "gpu_memory"
GPUS_ALL = "all"
PROCESS_CACHE_S = 0.01  # per-process usage read at most this often (one query per GPU)


# -- pure: parsing, grouping, assignment ----------------------------------------------------
def _ascii_digits(text: str) -> bool:
    """``str.isdigit`` takes ``²`` and ``٣``, which ``int`` then refuses or CUDA never means."""
    return text.isascii() and text.isdigit()


NO_GPU_ENTRIES = ("", "-1", "NoDevFiles")  # a scheduler's way of saying "no GPU for you"


def inherited_devices(environ: Mapping[str, str]) -> list[str] | None:
    """The supervisor's own ``CUDA_VISIBLE_DEVICES`` entries (a scheduler's allocation);
    ``None`` when it is unset, empty when it allocates no GPU."""
    value = environ.get(CUDA_ENV)
    if value is None:
        return None
    if value.strip() in NO_GPU_ENTRIES:
        return []
    return [d.strip() for d in value.split(",") if d.strip()]


def within_inherited(
    indices: Sequence[str], inherited: Sequence[str], option: str = "--gpus"
) -> tuple[str, ...]:
    """Indices as positions in an inherited list (i -> ``inherited[i]``), as CUDA itself
    reads them under it: a scheduler's allocation is never escaped."""
    outside = [i for i in indices if int(i) >= len(inherited)]
    if outside:
        have = f"0-{len(inherited) - 1}" if inherited else "none"
        raise UsageError(
            f"{option}: GPU {','.join(outside)} is outside the inherited {CUDA_ENV}="
            f"{','.join(inherited)!r} ({len(inherited)} GPU(s): indices {have})"
        )
    return tuple(inherited[int(i)] for i in indices)


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
        if isinstance(item, bool) or not _ascii_digits(text):
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
    Under an inherited ``CUDA_VISIBLE_DEVICES`` the entries are the scheduler's, in the
    order it meant them: none is added either.
    """
    if not devices:
        return {}
    env = {CUDA_ENV: ",".join(devices)}
    if CUDA_ENV not in environ and not environ.get(ORDER_ENV, "").strip():
        env[ORDER_ENV] = "PCI_BUS_ID"
    return env


def describe_groups(groups: Sequence[Sequence[str]], workers: int) -> str:
    """``GPUs 0,1 | 2,3 (2 per worker)``, for the run's first line."""
    if not groups:
        return ""
    text = f"GPUs {' | '.join(','.join(g) for g in groups)} ({len(groups[0])} per worker"
    if workers > len(groups):
        text += f", {workers} workers share {len(groups)} group(s)"
    elif workers < len(groups):  # said, not silently left idle
        unused = " | ".join(",".join(g) for g in groups[workers:])
        text += f"; {workers} worker(s) for {len(groups)} groups: GPUs {unused} stay unused"
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


def _lookup(modules: Mapping[str, Any], module: str, *attrs: str) -> type | None:
    """``module.attrs...`` when ``module`` is already imported, else ``None``."""
    found: Any = modules.get(module)
    for attr in attrs:
        found = getattr(found, attr, None)
    return found if isinstance(found, type) else None


GPU_OOM_TYPES = (  # (module, attribute path): looked up, never imported
    ("torch", ("OutOfMemoryError",)),
    ("torch.cuda", ("OutOfMemoryError",)),
    ("cupy.cuda.memory", ("OutOfMemoryError",)),
)
RAM_OOM_TYPES = (  # numpy's failed allocation; MemoryError itself is matched exactly
    ("numpy._core._exceptions", ("_ArrayMemoryError",)),
    ("numpy.core._exceptions", ("_ArrayMemoryError",)),
)


def oom_reason(exc: BaseException, modules: Mapping[str, Any] = sys.modules) -> str | None:
    """``gpu_memory`` for torch's or CuPy's CUDA out-of-memory error, ``memory`` for
    ``MemoryError`` itself or numpy's failed allocation, else ``None``: a user's own
    ``MemoryError`` subclass (a quota, say) is the objective's error, not the guard's.
    GPU types come first (CuPy's derives from MemoryError). Modules are looked up, never
    imported: an objective that raised their error has imported them already."""
    for module, attrs in GPU_OOM_TYPES:
        oom = _lookup(modules, module, *attrs)
        if oom is not None and isinstance(exc, oom):
            return REASON_GPU_MEMORY
    if type(exc) is MemoryError:
        return "memory"
    for module, attrs in RAM_OOM_TYPES:
        oom = _lookup(modules, module, *attrs)
        if oom is not None and type(exc) is oom:
            return "memory"
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
            if _ascii_digits(device):
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
    UUIDs included), else every GPU NVML counts; an error when neither can tell. Indices
    under an inherited list are positions in it (``within_inherited``).
    """
    indices = parse_gpus(value, option)
    inherited = inherited_devices(os.environ)
    if inherited == []:
        raise UsageError(
            f"{option}: the inherited {CUDA_ENV}={os.environ[CUDA_ENV]!r} allocates no GPU"
        )
    if inherited is not None:
        return tuple(inherited) if indices is None else within_inherited(
            indices, inherited, option
        )
    lib = nvml()
    if indices is None:
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
    try:  # the properties, not mem_get_info: that creates a CUDA context on every device
        return [int(cuda.get_device_properties(d).total_memory) for d in range(cuda.device_count())]
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
    if limit is None:  # NVML is there but knows none of these GPUs: nothing ever will
        devices = " | ".join(",".join(g) for g in groups) or os.environ.get(CUDA_ENV, "all")
        raise UsageError(
            f"--max-vram {limits.max_vram_percent:g}%: NVML does not know the memory of the "
            f"GPUs ({devices}); give a size instead (--max-vram 20GB)"
        )
    return replace(limits, max_vram_bytes=limit, max_vram_percent=None)


def unwatched_warning(limits: Any, why: str) -> str | None:
    """The one warning line when ``--max-vram`` is set and nothing watches GPU memory from
    outside the workers (``why``: NVML unavailable), else ``None``: a limit silently
    unenforced is worse than none."""
    if not limits.vram_limited or not why:
        return None
    text = (
        f"warning: --max-vram is not enforced from outside the workers: {why}; each worker "
        "checks only its own process, with torch's counters, once the objective uses CUDA"
    )
    if limits.max_vram_percent is not None:
        text += f", and {limits.max_vram_percent:g}% only once torch knows the GPUs' totals"
    return text
