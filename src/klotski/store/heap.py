"""The process heap under a memory budget: freed activations go back to the OS at once.

The budget counts what the store holds (TierPool); activations are outside it and come and go
every layer: tensors of 1-100 MB. glibc's malloc raises its mmap threshold to the size of the
largest chunk it has freed (up to 32 MiB), after which such tensors come from the heap and what
they free stays in the process, where a tight memory cgroup counts it (docs/offloading.md has the
measurement: an OOM kill without the fix). A fixed threshold makes every allocation of 1 MiB or
more its own mapping, returned to the OS when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 20
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_applied: bool | None = None


def return_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Fix malloc's mmap and trim thresholds (glibc); whether they are now fixed.

    Idempotent. Leaves the process alone where the user set either threshold in the environment
    (their choice stands) or where the C library is not glibc (no mallopt: returns False).
    """
    global _applied
    if _applied is not None:
        return _applied
    if any(name in os.environ for name in _ENV):
        _applied = False
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _applied = False
        return _applied
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, threshold))
    return _applied
