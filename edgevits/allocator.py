"""Keep glibc's allocator from handing freed memory back to the kernel between forward passes.

A CPU forward pass allocates and frees the same large activation buffers (megabytes each in the first stages) on
every call. glibc's malloc serves blocks above its mmap threshold with fresh mappings and trims the top of the
heap when enough is free, so the next call page-faults the same memory back in, zero-filled: about 1,000-4,500
minor faults per forward pass of these models at batch 1, 10-20% of their latency on the machines we measured
(SwiftFormer-XS 20.0 -> 16.7 ms, EfficientFormerV2-S0 16.2 -> 14.0 ms on one thread; timm's models gain alike).
``tune_malloc()`` raises both thresholds so the memory stays in the process (its resident size stays at the peak
the model needs). It changes process-wide state, so nothing in edgevits calls it implicitly except
``edgevits bench`` (which applies it to every model it measures, ours and timm's alike; ``--no-tune-malloc``
turns it off).
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's upper limit for the mmap threshold on 64-bit
TRIM_THRESHOLD = 1024 * 1024 * 1024


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds (see the module docstring); True when applied, False where the C
    library is not glibc (musl, macOS, Windows) and nothing was changed."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
