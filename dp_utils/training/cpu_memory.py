"""CPU training: keep freed memory in the process between steps instead of giving it back to the kernel.

glibc's malloc hands large freed blocks back to the kernel (blocks above the mmap threshold are unmapped, and the
heap top above the trim threshold is released), so every training step faults the same activations and gradients
back in, page by page; flash_bk, which keeps every layer's output gradient until the backward ends, faults the most
(what it cost is measured in benchmarks/README.md). Peak memory is unchanged: the process keeps what it would
allocate again in the next step.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc refuses more on 64-bit systems


def retain_freed_memory() -> bool:
    """Make glibc keep freed blocks up to 32 MiB and up to 2 GiB of free heap top; False (nothing done) off glibc.

    Process-wide, so applications call it (the trainer on CPU, the benchmark in every mode), not the engine.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # another C library with its own allocator
        return False
    # Both thresholds: setting the trim threshold alone also pins the mmap threshold at its 128 KiB default (glibc
    # stops raising it as big blocks are freed), and then every big tensor is a fresh mmap.
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
