"""Allocator settings for the command line: keep freed memory in the process.

Sampling loops allocate and free the same large tensors every step. glibc's ``malloc``
serves blocks above its mmap threshold (a few MB after its own adjustment) with fresh
``mmap`` calls and returns freed memory at the top of the heap to the system, so every step
pays page faults to zero-fill memory it had a moment ago. On the bench's posterior samplers
(d = 80, 16,000 particles) that was half the run time, spent in the kernel.

:func:`keep_freed_memory` raises the mmap and trim thresholds with ``mallopt`` (the
equivalent of ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``): freed blocks are
reused, and the process keeps its peak memory until it exits. The command line calls it at
start; the library never does (it is a process-wide choice). ``DIFFUSOLVE_MALLOC=system``
turns it off; on other C libraries it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory", "ENV"]

#: set to ``system`` to keep the C library's defaults
ENV = "DIFFUSOLVE_MALLOC"
_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap and are reused
_TRIM_THRESHOLD = (1 << 31) - 1  # never give the top of the heap back while running

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed large blocks instead of unmapping them; ``True`` when the
    settings took effect (idempotent; ``False`` off glibc or with ``DIFFUSOLVE_MALLOC=system``).
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get(ENV, "").strip().lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl has no such thresholds
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok
    _done = ok
    return ok
