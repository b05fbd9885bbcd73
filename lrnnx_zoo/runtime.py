"""Process-level settings that decide CPU speed more than any kernel does.

PyTorch's CPU tensors come straight from the C allocator. With glibc, every buffer above the
mmap threshold is a fresh mmap: each forward pays a page fault per 4 KiB page it touches and an
munmap on the way out. Convolution-mode layers allocate several input-sized buffers (padded
signal, spectra) per call, so at (B=8, L=1024, H=128) these faults took half of an S4D forward
(9.8 ms -> 4.3 ms with them gone, benchmarks/bench_layers.py). ``tune_allocator`` keeps freed
memory in the heap for reuse, as jemalloc or tcmalloc (LD_PRELOAD) would. It changes the whole
process, so the library never calls it on import: the command-line tools, the demo and the
benchmarks do, and applications opt in.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied = False


def tune_allocator(trim_threshold: int = 1 << 30) -> bool:
    """Serve large buffers from the heap and keep up to ``trim_threshold`` bytes of freed memory.

    Returns True if applied (glibc on Linux), False elsewhere; idempotent.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return _applied
