"""Memory readings (psutil), the same on Linux, macOS and Windows."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from pathlib import Path

import psutil
import torch


def available_bytes() -> int:
    """Memory the system can give this process now without swapping."""
    return int(psutil.virtual_memory().available)


def resident_bytes() -> int:
    """This process's resident memory now."""
    return int(psutil.Process().memory_info().rss)


def peak_resident_bytes() -> int:
    """This process's peak resident memory so far (``ru_maxrss``: KiB on Linux, bytes on
    macOS; psutil's ``peak_wset`` on Windows)."""
    info = psutil.Process().memory_info()
    if hasattr(info, "peak_wset"):
        return int(info.peak_wset)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def process_peak_bytes(pid: int) -> int:
    """Peak resident memory of another process, for benchmarks that poll a child: Linux's
    own high-water mark (``VmHWM``, which exec resets, unlike ``ru_maxrss``) where the system
    keeps one, else its resident memory now (poll it to follow the peak)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return int(psutil.Process(pid).memory_info().rss)


def total_bytes() -> int:
    """The machine's memory."""
    return int(psutil.virtual_memory().total)


def peak_bytes(device: torch.device) -> int:
    """Peak memory of a run on ``device``: the GPU's allocator peak, or the process's RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_resident_bytes()


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc ``malloc_trim``) after a block:
    tensors of a few MB come from the heap, and without this a long run's resident memory
    creeps up with fragmentation instead of staying flat. A no-op elsewhere."""
    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(name).malloc_trim(0)
