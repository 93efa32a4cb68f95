"""Freed CPU memory kept for reuse: eager CPU inference without page faults (glibc malloc).

Eager PyTorch allocates every layer's output and frees it a layer or two later. With glibc's
malloc (Linux), a freed block of tens of MB goes back to the kernel -- unmapped when it was
above the mmap threshold, trimmed off the heap when the free space on top of it passes the trim
threshold -- and the next allocation of that size takes a page fault on each 4 KiB page it
touches, which the kernel also zeroes. Measured on a 2-core EPYC: ResNet-50 in eager at batch 8,
channels_last fp32, ~19,000 page faults (~75 MB) per forward, torchvision's modules and ours
alike; torch.compile plans its buffers and has none. At batch 1 the blocks are small enough that
glibc's dynamic thresholds keep them.

``keep_freed_memory(limit)`` sets both thresholds (``mallopt(M_MMAP_THRESHOLD)`` and
``mallopt(M_TRIM_THRESHOLD)``) to ``limit`` bytes: blocks below it come from the heap, and up to
``limit`` bytes of free heap stay mapped, so a forward reuses the pages of the one before. The
cost: the process keeps up to ``limit`` bytes it no longer uses, and glibc's dynamic threshold
adjustment is off from then on. It is process-wide and can't be undone, so the library never
does it by itself: an application (or the main job, which says so in its header) calls it once.
The same setting without code: ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=N:glibc.malloc.trim_threshold=N``
in the environment; another allocator (jemalloc, tcmalloc via LD_PRELOAD, as torch's
``torch.backends.xeon.run_cpu`` launcher does) has its own rules.
"""
from __future__ import annotations

import ctypes
import platform
from typing import Optional

__all__ = ["DEFAULT_LIMIT", "keep_freed_memory", "kept_freed_memory"]

DEFAULT_LIMIT = 1 << 30  # 1 GiB: ResNet-50 at batch 8 frees and reallocates blocks of 6-26 MB
_MAX_LIMIT = 2**31 - 1  # mallopt takes an int
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_kept: Optional[int] = None


def _mallopt():
    """glibc's ``mallopt``, or None (another C library, or none found)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return fn


def keep_freed_memory(limit: int = DEFAULT_LIMIT) -> bool:
    """Have glibc's malloc keep up to ``limit`` bytes of freed memory mapped for reuse, and serve
    blocks below ``limit`` from it (see the module docstring). Process-wide and permanent.
    Returns True when set, False where the C library is not glibc (nothing changed)."""
    global _kept
    if isinstance(limit, bool) or not isinstance(limit, int) or not (1 << 20) <= limit <= _MAX_LIMIT:
        raise ValueError(f"keep_freed_memory: limit must be an int of bytes from 1 MiB to "
                         f"{_MAX_LIMIT} (2 GiB - 1), got {limit!r}")
    mallopt = _mallopt()
    if mallopt is None:
        return False
    if not (mallopt(_M_MMAP_THRESHOLD, limit) and mallopt(_M_TRIM_THRESHOLD, limit)):
        raise RuntimeError(f"keep_freed_memory: glibc's mallopt refused a threshold of {limit} bytes")
    _kept = limit
    return True


def kept_freed_memory() -> Optional[int]:
    """The ``limit`` of the last successful ``keep_freed_memory`` call in this process (None:
    never called, or not glibc). Settings made through GLIBC_TUNABLES are not seen here."""
    return _kept
