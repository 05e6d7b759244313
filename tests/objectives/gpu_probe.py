"""Objectives that tell what a worker saw of its GPUs: each records it as user attributes.

``probe.devices`` is the worker's ``CUDA_VISIBLE_DEVICES`` (None when unset), ``probe.worker``
its ``OPTGUARD_WORKER`` (``index.spawn``: a replacement keeps the index), ``probe.torch``
whether torch was imported in the worker when the trial began and ended.
"""

import os
import sys
import time
from typing import Any

import optuna


def _record(trial: optuna.Trial) -> None:
    trial.set_user_attr("probe.devices", os.environ.get("CUDA_VISIBLE_DEVICES"))
    trial.set_user_attr("probe.order", os.environ.get("CUDA_DEVICE_ORDER"))
    trial.set_user_attr("probe.worker", os.environ.get("OPTGUARD_WORKER"))
    trial.set_user_attr("probe.torch", "torch" in sys.modules)


def env(trial: optuna.Trial) -> float:
    """Records, reports (so the guard checks, --max-vram included), and takes 0.2 s so that
    every started worker gets trials; ``probe.torch_end``: torch imported by the checks."""
    _record(trial)
    x = trial.suggest_float("x", 0.0, 1.0)
    for step in range(3):
        trial.report(x, step)
    trial.set_user_attr("probe.torch_end", "torch" in sys.modules)
    time.sleep(0.2)
    return x


def dies_first(trial: optuna.Trial) -> float:
    """Trial 0 kills its worker: the replacement must get the same GPUs."""
    _record(trial)
    if trial.number == 0:
        os._exit(3)
    return trial.suggest_float("x", 0.0, 1.0)


CUDA_INIT_CALLS: list[str] = []  # every call of torch.cuda's initialization in this worker


def _watch_cuda_init() -> None:
    """Wrap ``torch.cuda.init`` and ``_lazy_init`` wherever a ``torch.cuda`` module binds
    them, once per worker, so that every attempt to initialize CUDA is recorded: without a
    GPU it fails and ``is_initialized()`` stays False, which would hide it."""
    if getattr(_watch_cuda_init, "done", False):
        return
    _watch_cuda_init.done = True  # type: ignore[attr-defined]
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "torch.cuda" or name.startswith("torch.cuda.")):
            continue
        for attr in ("init", "_lazy_init"):
            original = vars(module).get(attr)
            if callable(original):
                setattr(module, attr, _recording(f"{name}.{attr}", original))


def _recording(label: str, original: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        CUDA_INIT_CALLS.append(label)
        return original(*args, **kwargs)

    return call


def torch_cpu(trial: optuna.Trial) -> float:
    """Uses torch on the CPU: records the CUDA initializations seen when the trial began (the
    previous trial's cleanup) and after its reports (the guard's checks): none may happen."""
    import torch

    _watch_cuda_init()
    trial.set_user_attr("probe.cuda_initialized", bool(torch.cuda.is_initialized()))
    trial.set_user_attr("probe.cuda_init_calls_start", list(CUDA_INIT_CALLS))
    x = trial.suggest_float("x", 0.0, 1.0)
    value = float((torch.ones(64, 64) * x).sum())
    for step in range(3):
        trial.report(value, step)
    trial.set_user_attr("probe.cuda_init_calls_end", list(CUDA_INIT_CALLS))
    return value


def torch_cuda_init(trial: optuna.Trial) -> float:
    """As ``torch_cpu``, but asks torch for the GPU's memory: the probe must see it."""
    import torch

    _watch_cuda_init()
    try:
        torch.cuda.mem_get_info(0)
    except (AssertionError, RuntimeError):
        pass  # no CUDA here: the attempt is what counts
    trial.set_user_attr("probe.cuda_init_calls_end", list(CUDA_INIT_CALLS))
    return trial.suggest_float("x", 0.0, 1.0)


def raises_memory_error(trial: optuna.Trial) -> float:
    trial.suggest_float("x", 0.0, 1.0)
    raise MemoryError("cannot allocate 20 GB")


class QuotaExceeded(MemoryError):
    """A user's own MemoryError subclass, for something that is not memory at all."""


def raises_quota(trial: optuna.Trial) -> float:
    trial.suggest_float("x", 0.0, 1.0)
    raise QuotaExceeded("API quota exceeded")


def numpy_oom(trial: optuna.Trial) -> float:
    """numpy's own failed allocation (_ArrayMemoryError): 16 TB, refused at once."""
    import numpy

    trial.suggest_float("x", 0.0, 1.0)
    return float(numpy.empty(2**41, dtype=numpy.float64).sum())


def raises_cuda_oom(trial: optuna.Trial) -> float:
    """torch's own CUDA out-of-memory exception, as a failed allocation raises it."""
    import torch

    trial.suggest_float("x", 0.0, 1.0)
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def leaks_gpu(trial: optuna.Trial) -> float:
    """On a GPU: holds 100 MB more every step and reports, until the guard prunes it."""
    import torch

    x = trial.suggest_float("x", 0.0, 1.0)
    held = []
    for step in range(200):
        held.append(torch.empty(100 * 2**20, dtype=torch.uint8, device="cuda"))
        trial.report(x, step)
        time.sleep(0.02)
    return x


def holds_memory(trial: optuna.Trial) -> float:
    """Holds 50 MB more every 50 ms and never reports: only the supervisor, from outside,
    can end it (under the fake NVML, a worker's RSS is its GPU memory)."""
    x = trial.suggest_float("x", 0.0, 1.0)
    held = []
    for _ in range(100):
        held.append(bytearray(50 * 10**6))
        time.sleep(0.05)
    return x
