"""Let large freed blocks stay in the C heap on glibc, for the next allocation of their size to reuse.

glibc's malloc takes every block above its mmap threshold (at most 32 MB, by default) from the
kernel as fresh pages and gives them back on free. On CPU each large layer output is then page-
faulted and zeroed by the kernel on every call: bonsai-4b at 512x512 writes 75-100 MB per GEMM,
and its steps ran 1.2x slower for it (benchmarks/RESULTS.md, "CPU, 2026-12-05: the C heap").
Raising the mmap and trim thresholds keeps such blocks in the heap, as glibc's own dynamic
threshold does for blocks up to 32 MB. The cost: the heap stays near its high-water mark (+0.28
GiB peak RSS there).

Set BONSAI_MALLOC_TUNING=0 to keep glibc's behaviour; MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_
or GLIBC_TUNABLES set by the user are left to rule as well.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

MMAP_THRESHOLD = 256 << 20  # blocks up to this size come from the heap
TRIM_THRESHOLD = 512 << 20  # free heap top kept before memory goes back to the kernel
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


@functools.cache
def keep_large_blocks() -> bool:
    """Raise glibc's mmap and trim thresholds, once per process. False where it does not apply: not
    glibc, turned off by BONSAI_MALLOC_TUNING=0, or thresholds the user set."""
    if os.environ.get("BONSAI_MALLOC_TUNING", "1") == "0" or any(v in os.environ for v in _USER_SETTINGS):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
