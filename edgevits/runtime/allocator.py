"""Keep glibc's allocator from handing freed memory back to the kernel between forward passes.

A CPU forward pass allocates and frees the same large activation buffers (megabytes each in the first stages) on
every call. glibc's malloc serves blocks above its mmap threshold with fresh mappings and trims the top of the
heap when enough is free, so the next call page-faults the same memory back in, zero-filled: about 1,000-4,500
minor faults per forward pass of these models at batch 1, 10-20% of their latency on the machines we measured
(SwiftFormer-XS 20.0 -> 16.7 ms, EfficientFormerV2-S0 16.2 -> 14.0 ms on one thread; timm's models gain alike).
Raising the mmap and trim thresholds keeps the memory in the process (its resident size stays at the peak the
model needs), as a caching allocator in a deployed runtime would.

``tune_malloc()`` does so for the rest of the process; ``reuse_freed_memory()`` for a ``with`` block (restoring
glibc's defaults after it). Both change process-wide state, so nothing in edgevits applies them implicitly except
``edgevits bench`` (``tune_malloc``, for every model it measures, ours and timm's alike; ``--no-tune-malloc``
turns it off) and ``edgevits analyze`` (``reuse_freed_memory`` around its timings).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import platform

# glibc mallopt parameters, the values we set, and glibc's defaults (the mmap threshold's is dynamic from 128 KiB)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_TUNED = {_M_MMAP_THRESHOLD: 1 << 30, _M_TRIM_THRESHOLD: 1 << 31, _M_TOP_PAD: 256 << 20}
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_TOP_PAD: 0, _M_MMAP_THRESHOLD: 128 * 1024}


def _mallopt(settings: dict[int, int]) -> bool:
    """Apply glibc ``mallopt`` settings; False (and nothing changed) where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(k, v) == 1 for k, v in settings.items())


def tune_malloc() -> bool:
    """Keep freed memory in the process from now on (see the module docstring); True when applied, False where
    the C library is not glibc (musl, macOS, Windows) and nothing was changed."""
    return _mallopt(_TUNED)


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True):
    """``tune_malloc`` for a ``with`` block, yielding whether it took effect; glibc's defaults are restored on
    exit (also those ``tune_malloc`` had changed before)."""
    ok = _mallopt(_TUNED) if enabled else False
    try:
        yield ok
    finally:
        if ok:
            _mallopt(_GLIBC_DEFAULTS)
