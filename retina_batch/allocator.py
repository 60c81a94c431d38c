"""Memory-allocator settings for a process that streams images.

Every image makes and frees a dozen arrays of 0.25-25 MB (decoded pixels, canvases, the float
planes of the quality flags, masks). glibc serves blocks above its mmap threshold (128 kB at
start, raised only as far as the largest block freed so far) with a fresh mmap and gives them
back with munmap, and it trims the free top of its heaps above 128 kB. Either way each new
array's pages are faulted in and zeroed by the kernel again: per 512 px photograph that was
about half of the quality flags' CPU time (4.7-5.7 -> 2.6-2.7 ms per image with the settings
below, process CPU, `benchmarks/host_steps.py --default-allocator` against without it;
benchmarks/README.md, "Host cost per image").

`keep_freed_memory()` tells glibc to serve those blocks from its heaps and to keep freed memory
for reuse: the process's resident memory stays near its peak instead of falling between images,
which a long run reaches anyway. Elsewhere (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# mallopt(3) parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3

SETTINGS = {
    # Blocks below this come from the heap: a 3504 x 2336 RGB image (24.6 MB) does. 32 MB is
    # glibc's upper limit for this setting on 64-bit systems (larger values are refused).
    M_MMAP_THRESHOLD: 32 * 2**20,
    # Free memory at a heap's top is given back to the system only above this.
    M_TRIM_THRESHOLD: 256 * 2**20,
    # A heap grows by this much more than it needs, so growth is rare.
    M_TOP_PAD: 64 * 2**20,
}


@functools.cache
def keep_freed_memory() -> bool:
    """Apply SETTINGS once per process; True if glibc took all of them."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # no C library found, or one without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(param, value) == 1 for param, value in SETTINGS.items()])
