"""Process-wide memory tuning for the bulk data path.

Every chunk of an image is a fresh 1 MiB ``bytes`` object (a file read, a
socket read, Twisted joining a frame).  glibc serves allocations that large
with ``mmap`` and gives them back with ``munmap``, or trims the heap top
after each free, so every chunk is page-faulted in again: a quarter of a
million page faults per GiB, which profiling showed to be the largest
single CPU cost on both sides.  Raising the mmap and trim thresholds keeps
those blocks in the heap for reuse.  Peak memory stays bounded by the flow
control window, since no more chunks than that are alive at once.
"""

from __future__ import annotations

import ctypes
import functools
import platform

#: glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Keep blocks up to this size in the heap, and this much free heap untrimmed.
MMAP_THRESHOLD = 8 * 1024 * 1024
TRIM_THRESHOLD = 8 * 1024 * 1024


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library, where it is glibc (for calls Python does not wrap).

    The symbols of the process itself (``dlopen(NULL)``), which hold the C
    library the interpreter runs on, not a library found by name:
    ``ctypes.util.find_library`` runs ``ldconfig -p`` in a child process,
    which every ``securemig migrate`` and daemon then paid for at start-up,
    twice (doc/performance.rst, "Start-up").  Asked once per process
    (``platform.libc_ver`` asks ``confstr``, no file is read)."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def tune_malloc() -> bool:
    """Apply the thresholds; returns False where the C library is not glibc."""
    libc = glibc()
    if libc is None:
        return False
    ok: bool = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return ok and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
