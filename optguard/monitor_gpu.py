"""GPU memory for ``optguard monitor``: NVML when installed, else torch, else nothing.

NVML (``pip install 'optguard[gpu]'``, module ``pynvml``) reads every GPU's memory without
touching it. torch is the fallback and is imported only when it is installed *and* a GPU
device node exists, so a CPU-only box never pays its import; note that torch creates a CUDA
context on each GPU it asks (a few hundred MB each), which NVML does not.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

__all__ = ["GpuProbe"]

# Device nodes of the NVIDIA and AMD (ROCm) drivers: without one torch.cuda has nothing to find.
_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")


class GpuProbe:
    """Reads each GPU's used and total memory; ``notice`` says once why there are none."""

    def __init__(self) -> None:
        self.backend: str | None = None
        self.notice: str | None = None
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._torch: Any = None
        why = "nvidia-ml-py not installed"
        if importlib.util.find_spec("pynvml") is not None:
            why = self._start_nvml()
        if self.backend is None and self._start_torch():
            return
        if self.backend is None:
            self.notice = (
                f"GPU memory skipped: {why}; no usable torch.cuda either "
                "(pip install 'optguard[gpu]' for NVIDIA GPUs)"
            )

    def _start_nvml(self) -> str:
        """Initialise NVML; the reason it cannot be used, or "" when it can."""
        pynvml = importlib.import_module("pynvml")
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except pynvml.NVMLError as exc:
            return f"NVML unavailable ({exc})"
        self._nvml = pynvml
        self.backend = "nvml"
        if not self._handles:
            self.notice = "GPU memory skipped: NVML found no GPU"
        return ""

    def _start_torch(self) -> bool:
        if importlib.util.find_spec("torch") is None:
            return False
        if not any(Path(node).exists() for node in _GPU_NODES):
            return False  # no GPU driver: importing torch would cost seconds for nothing
        torch = importlib.import_module("torch")
        if not torch.cuda.is_available():
            return False
        self._torch = torch
        self.backend = "torch"
        return True

    def read(self) -> list[dict[str, Any]]:
        """One entry per GPU: ``index``, ``name``, ``used_bytes``, ``total_bytes``, ``percent``."""
        if self._nvml is not None:
            return self._read_nvml()
        if self._torch is not None:
            return self._read_torch()
        return []

    def _read_nvml(self) -> list[dict[str, Any]]:
        pynvml = self._nvml
        gpus = []
        for index, handle in enumerate(self._handles):
            try:
                info = pynvml.nvmlDeviceGetMemoryInfo(handle)
                name = pynvml.nvmlDeviceGetName(handle)
            except pynvml.NVMLError:
                continue  # the GPU fell off the bus or was reset: absent from this sample
            if isinstance(name, bytes):
                name = name.decode(errors="replace")
            gpus.append(_entry(index, str(name), int(info.used), int(info.total)))
        return gpus

    def _read_torch(self) -> list[dict[str, Any]]:
        cuda = self._torch.cuda
        gpus = []
        for index in range(cuda.device_count()):
            try:
                free, total = cuda.mem_get_info(index)
            except RuntimeError:
                continue  # the device is in a bad state: absent from this sample
            gpus.append(_entry(index, cuda.get_device_name(index), total - free, total))
        return gpus

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass  # already shut down: nothing to release
            self._nvml = None


def _entry(index: int, name: str, used: int, total: int) -> dict[str, Any]:
    percent = round(100.0 * used / total, 1) if total else 0.0
    return {"index": index, "name": name, "used_bytes": used, "total_bytes": total,
            "percent": percent}  # fmt: skip
