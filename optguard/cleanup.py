"""Give memory back after every trial: CUDA cache, cyclic garbage, and glibc's free lists."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
import time
from dataclasses import dataclass
from typing import Callable

from optguard.gpus import own_gpu_memory
from optguard.memory import current_rss

__all__ = ["CleanupReport", "release_memory"]

GC_PASSES = 3


@dataclass(frozen=True)
class CleanupReport:
    rss_before: int
    rss_after: int
    collected: int
    gc_passes: int
    cuda_emptied: bool
    malloc_trimmed: bool
    seconds: float
    gpu_after: int | None = None  # this process's GPU memory, when it used CUDA

    @property
    def freed_bytes(self) -> int:
        return max(0, self.rss_before - self.rss_after)


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc (musl, macOS): nothing to trim, skip silently
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


def _empty_cuda_cache() -> bool:
    """Empty torch's CUDA cache only if the objective already imported torch and used CUDA.

    Never imports torch and never initializes CUDA: either would cost seconds and hundreds of
    megabytes in a worker whose objective does not use them.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    cuda = getattr(torch, "cuda", None)
    if cuda is None or not cuda.is_initialized():
        return False
    cuda.empty_cache()
    return True


def release_memory() -> CleanupReport:
    """Run the post-trial cleanup and measure what it gave back."""
    start = time.perf_counter()
    before = current_rss()
    cuda = _empty_cuda_cache()
    collected = 0
    passes = 0
    for _ in range(GC_PASSES):
        passes += 1
        found = gc.collect()
        collected += found
        if found == 0:
            break  # a pass that finds nothing means the next ones would not either
    trimmed = False
    if _malloc_trim is not None:
        _malloc_trim(0)
        trimmed = True
    return CleanupReport(
        rss_before=before,
        rss_after=current_rss(),
        collected=collected,
        gc_passes=passes,
        cuda_emptied=cuda,
        malloc_trimmed=trimmed,
        seconds=time.perf_counter() - start,
        # NVML only if the guard already started it (--max-vram): no cost for the others
        gpu_after=own_gpu_memory(with_nvml=False),
    )
