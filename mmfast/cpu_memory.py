"""Host memory for CPU training: keep freed blocks for reuse instead of returning them to the OS.

A training step allocates and frees the same large buffers every step (activations, their
gradients, the convolution workspaces). glibc's malloc serves large requests with fresh mmap'd
pages (above its mmap threshold) and trims freed memory at the top of the heap back to the OS,
so the next step's buffers are new pages again, which the kernel zero-fills on first touch: a
page fault per 4 KiB. Measured on 2 AVX-512 cores, the embedded config's fp32 epoch took 1.31-1.45 s
with the settings below against 1.53-1.84 s without (steps about 1.4x faster). jemalloc or
tcmalloc (LD_PRELOAD) cure the same; this needs neither.

The setting is process-wide and one-way (glibc has no call that restores its dynamic
thresholds); the process's peak heap then stays mapped until it exits.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_NEVER_TRIM = 2**31 - 1  # bytes (mallopt takes an int): freed memory at the top of the heap stays


@functools.lru_cache(maxsize=None)
def retain_freed_memory() -> bool:
    """Makes glibc's malloc serve every block from the heap (no mmap) and never trim it, so a
    training loop reuses its pages from step to step. Returns False where the C library is not
    glibc (nothing changed). Idempotent; the trainer calls it for CPU runs
    (config key `retain_freed_memory`, default true)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # (glibc only: musl also has mallopt, as a no-op)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
