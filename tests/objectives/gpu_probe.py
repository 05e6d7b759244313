"""Objectives that tell what a worker saw of its GPUs: each records it as user attributes.

``probe.devices`` is the worker's ``CUDA_VISIBLE_DEVICES`` (None when unset), ``probe.worker``
its ``OPTGUARD_WORKER`` (``index.spawn``: a replacement keeps the index), ``probe.torch``
whether torch was imported in the worker when the trial began and ended.
"""

import os
import sys
import time

import optuna


def _record(trial: optuna.Trial) -> None:
    trial.set_user_attr("probe.devices", os.environ.get("CUDA_VISIBLE_DEVICES"))
    trial.set_user_attr("probe.order", os.environ.get("CUDA_DEVICE_ORDER"))
    trial.set_user_attr("probe.worker", os.environ.get("OPTGUARD_WORKER"))
    trial.set_user_attr("probe.torch", "torch" in sys.modules)


def env(trial: optuna.Trial) -> float:
    """Records, reports (so the guard checks, --max-vram included), and takes 0.2 s so that
    every started worker gets trials."""
    _record(trial)
    x = trial.suggest_float("x", 0.0, 1.0)
    for step in range(3):
        trial.report(x, step)
    time.sleep(0.2)
    return x


def dies_first(trial: optuna.Trial) -> float:
    """Trial 0 kills its worker: the replacement must get the same GPUs."""
    _record(trial)
    if trial.number == 0:
        os._exit(3)
    return trial.suggest_float("x", 0.0, 1.0)


def torch_cpu(trial: optuna.Trial) -> float:
    """Uses torch on the CPU: records whether CUDA was initialized when the trial began (by
    the previous trial's cleanup or the guard's checks, which must never do it)."""
    import torch

    trial.set_user_attr("probe.cuda_initialized", bool(torch.cuda.is_initialized()))
    x = trial.suggest_float("x", 0.0, 1.0)
    value = float((torch.ones(64, 64) * x).sum())
    for step in range(3):
        trial.report(value, step)
    return value


def raises_memory_error(trial: optuna.Trial) -> float:
    trial.suggest_float("x", 0.0, 1.0)
    raise MemoryError("cannot allocate 20 GB")


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
