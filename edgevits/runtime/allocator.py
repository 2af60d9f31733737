"""Keep glibc's allocator from handing freed memory back to the kernel between forward passes.

A CPU forward pass allocates and frees the same large activation buffers (megabytes each in the first stages) on
every call. glibc's malloc serves blocks above its mmap threshold with fresh mappings and trims the top of the
heap when enough is free, so the next call page-faults the same memory back in, zero-filled: about 1,000-4,500
minor faults per forward pass of these models at batch 1, 10-20% of their latency on the machines we measured
(SwiftFormer-XS 20.0 -> 16.7 ms, EfficientFormerV2-S0 16.2 -> 14.0 ms on one thread; timm's models gain alike).
Raising the mmap and trim thresholds keeps the memory in the process (its resident size stays at the peak the
model needs), as a caching allocator in a deployed runtime would.

``malloc_tuned()`` does so for a ``with`` block and restores the settings in force before it on exit
(``reuse_freed_memory()`` is the same block under the name the analyses use); ``tune_malloc()`` does so for the rest
of the process. All of them change process-wide state, so nothing in edgevits applies them implicitly except
``edgevits bench`` (``malloc_tuned`` around its whole measurement, for every model it measures, ours and timm's
alike; ``--no-tune-malloc`` turns it off) and ``edgevits analyze`` (``reuse_freed_memory`` around its timings).
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

# What edgevits last set with mallopt (None: nothing yet, glibc's defaults assumed in force). glibc has no getter
# for these settings, so this is the only record of them there is.
_in_force: dict[int, int] | None = None


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


def _set(settings: dict[int, int] | None) -> bool:
    """Apply ``settings`` (None: glibc's defaults) and remember them as the ones in force; True when applied."""
    global _in_force
    ok = _mallopt(_GLIBC_DEFAULTS if settings is None else settings)
    if ok:
        _in_force = None if settings is None else dict(settings)
    return ok


def tune_malloc() -> bool:
    """Change this process's malloc settings to keep freed memory in the process from now on, for the rest of the
    process (see the module docstring; ``malloc_tuned`` does it for a ``with`` block only). True when applied, False
    where the C library is not glibc (musl, macOS, Windows) and nothing was changed. A ``malloc_tuned`` block that
    encloses the call restores, when it ends, the settings in force when it began."""
    return _set(_TUNED)


@contextlib.contextmanager
def malloc_tuned(enabled: bool = True):
    """Keep freed memory in the process for a ``with`` block, yielding whether the tuning took effect (False where
    ``enabled`` is false or the C library is not glibc; nothing is changed then).

    On exit the settings in force before the block are restored: those edgevits last set (``tune_malloc``, an
    enclosing block), or glibc's defaults where edgevits had set none. glibc has no getter for these settings, so
    its defaults are what can be restored: settings made outside edgevits (another library's ``mallopt``, the
    ``MALLOC_*`` environment variables or ``GLIBC_TUNABLES``) are not seen, and restoring the default mmap threshold
    fixes it at 128 KiB where glibc would have kept adjusting it."""
    before = _in_force
    ok = _set(_TUNED) if enabled else False
    try:
        yield ok
    finally:
        if ok:
            _set(before)


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True):
    """``malloc_tuned`` under the name the analyses use: the tuning for a ``with`` block, yielding whether it took
    effect; on exit the settings in force before the block are restored (see ``malloc_tuned``)."""
    with malloc_tuned(enabled) as ok:
        yield ok
