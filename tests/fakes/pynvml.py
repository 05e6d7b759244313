"""A stand-in for nvidia-ml-py's ``pynvml``: it stands in for a GPU this machine does not have.

Put ``tests/fakes`` first on ``PYTHONPATH`` to use it. Only for what needs NVML to answer:
the supervisor's outside enforcement of ``--max-vram`` and the validation that asks NVML.
Two GPUs of 80 GB; the "GPU memory" of a process is its RSS when its command line is an
``optguard worker`` (listed on GPU 0 only), so a worker that holds RAM holds "GPU memory".
A ``CUDA_VISIBLE_DEVICES`` UUID is unknown to it (``nvmlDeviceGetHandleByUUID`` fails), as
for a MIG instance NVML cannot name.
"""

from __future__ import annotations

import os

GPUS = 2
TOTAL = 80 * 10**9


class NVMLError(Exception):
    pass


class _Memory:
    total = TOTAL


class _Process:
    def __init__(self, pid: int, used: int) -> None:
        self.pid, self.usedGpuMemory = pid, used


def nvmlInit() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return GPUS


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    return index


def nvmlDeviceGetHandleByUUID(uuid: str) -> int:
    raise NVMLError(f"unknown UUID {uuid}")


def nvmlDeviceGetMemoryInfo(handle: int) -> _Memory:
    return _Memory()


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[_Process]:
    if handle != 0:
        return []
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"optguard\x00worker" not in f.read():
                    continue
            with open(f"/proc/{pid}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue  # gone meanwhile
        found.append(_Process(int(pid), rss))
    return found


def nvmlDeviceGetGraphicsRunningProcesses(handle: int) -> list[_Process]:
    return []
