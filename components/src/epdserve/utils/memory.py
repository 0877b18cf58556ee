"""Process-wide malloc settings for the serving processes.

A first write into a page the process has not touched yet costs far more than the write: the
kernel zeroes the page and, in a VM whose host backs guest memory lazily (this machine), the
host allocates it too. Measured here: 1.6 ms per MB for a first touch, 0.03 ms per MB after.
By default glibc hands big freed blocks (a prefill's per-layer activations are MBs, an HTTP
body with an image as much) back to the kernel, so the next request faults them in again.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # the largest M_MMAP_THRESHOLD glibc accepts (64-bit)
NEVER_TRIM = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make malloc keep freed memory for reuse: blocks up to MMAP_THRESHOLD_MAX come from its
    heaps, which are never trimmed. The process's RSS stays at its peak instead of dropping
    between requests. Returns False where the C library has no glibc `mallopt`."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
    if not done:
        log.warning("mallopt refused the settings; freed memory goes back to the kernel")
    return done
