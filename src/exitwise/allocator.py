"""glibc's malloc thresholds raised for the commands that run models, so a freed tensor's memory is reused.

glibc hands every allocation above its mmap threshold (128 KiB, raised only as large blocks are freed) its own
mmap and returns it on free, and trims the heap's top once 128 KiB of it is free: a loop that allocates and frees
the same large activations page-faults them in anew each time. The founding loop's batch-256 pass took 14 s instead
of 8.3 s on an AMD EPYC (Zen 4) from that alone; the whole study took 1.68-1.83 founding passes run as a command
there, against 1.35 in a benchmark that had raised the thresholds through the environment. Raised, freed memory stays in the heap and is reused (the process keeps its peak memory until it
exits, which a command that runs models and ends can afford). Torch-free; on other C libraries it does nothing.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
THRESHOLD = 2**31 - 1                        # mallopt takes an int: allocations over 2 GiB are still mmapped
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; whether it did. Does nothing off glibc, or where the
    user set malloc's thresholds or tunables in the environment (theirs win)."""
    if not sys.platform.startswith("linux") or any(k in os.environ for k in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
        if not hasattr(libc, "gnu_get_libc_version"):
            return False  # musl and others: their malloc has no such thresholds
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
