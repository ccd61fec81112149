"""glibc malloc settings for a daemon that moves large buffers.

A request allocates and frees a few buffers of 128 KiB to 1 MiB (data read from the disks,
the reply, joined payloads). By default glibc serves those with mmap, or gives the heap top
back to the kernel after each request, so every request page-faults its buffers in again:
measured here, a 512 KiB read spent ~0.9 ms of its ~1.4 ms CPU in the kernel zeroing fresh
pages. Serving them from the heap and keeping a bounded pad at its top makes that ~0.1 ms.
"""

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TOP_PAD = -2  # from <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20  # buffers below this come from the heap
TOP_PAD = 16 << 20  # kept at the heap top when trimming: bounds what RSS keeps idle


def tune_malloc() -> bool:
    """Apply the settings above; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("no mallopt in %s: malloc left as it is", name)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TOP_PAD, TOP_PAD))
