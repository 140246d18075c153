"""Process settings of the CPU side of a run: torch's thread count and how freed memory is kept.

glibc's malloc serves every block above its mmap threshold (32 MiB at most) with a fresh ``mmap`` and
unmaps it on ``free``. SAM's activations at 1024 px are 4-64 MiB each, so without a caching allocator
(PyTorch has none on CPU) every forward and backward maps its activations anew and the kernel zero-fills
them page by page on first touch. With ``runtime.keep_freed_memory`` the process keeps freed blocks in its
heap for the next tensor instead: on one core of the 2-core benchmark machine the vit_t encoder ran
1.4-1.5x and the decoder 1.6-1.7x faster, FP and fake-quantized alike (python -m saq.bench memory).
Values are untouched (only where memory comes from changes). glibc is no caching allocator: small
allocations split freed blocks now and then, so some pages still fault in and the resident peak grows
(about 10% for a vit_t reconstruction run).
"""

from __future__ import annotations

import ctypes
import logging
import sys
from typing import Any, Mapping

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
LARGEST_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: free memory above the heap top beyond 2 GiB is returned


def keep_freed_memory() -> bool:
    """Ask glibc to serve large blocks from the heap (no mmap) and to keep freed memory; returns whether
    it took effect (False off Linux/glibc, e.g. macOS or musl, where nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # glibc returns 1 on success; musl's mallopt is a stub that returns 0
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, LARGEST_TRIM_THRESHOLD) == 1


def apply_cpu_runtime(runtime: Mapping[str, Any]) -> None:
    """``runtime.num_threads`` (torch's intra-op threads) and ``runtime.keep_freed_memory``."""
    import torch  # here, not at import: the CLIs that import this module start without torch

    if runtime.get("num_threads"):
        torch.set_num_threads(int(runtime["num_threads"]))
    if runtime.get("keep_freed_memory", True) and not keep_freed_memory():
        log.info("runtime.keep_freed_memory: not a glibc system; the C library's default allocation is kept")
