"""Keep glibc's heap from growing with the number of chunks a harvest writes.

Why: each chunk write allocates and frees buffers of 3 to 30 MB (the encoded chunk, and the shard
file zarr reads back and rewrites around it) on zarr's worker threads, while the forward pass
allocates and frees its own 9 to 25 MB activations on the main thread. With glibc's defaults the
mmap threshold rises to the largest buffer freed (up to 32 MiB), so all of these land in per-thread
heaps whose free holes rarely fit the next, growing shard buffer, and the resident set climbed
with the dataset: SmolLM2-135M peaked at 1,221 MiB for 8K tokens and 1,738 MiB for 65K.

:func:`bound_heap` pins the threshold where the defaults end up anyway (so the forward pass keeps
reusing heap memory: a 1 MiB threshold made every activation a fresh ``mmap`` and the harvest
~25% slower) and keeps one heap for all threads; :func:`release_free_heap` hands the free pages
back after each chunk. Measured with both: 1,117 / 1,223 / 1,229 / 1,254 MiB at 8K / 32K / 65K /
131K tokens (BENCHMARKS.md, run 4). Outside glibc (macOS, musl) both do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import sys

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def bound_heap() -> bool:
    """Fix glibc's mmap threshold at 32 MiB and its arena count at one, for the rest of the
    process (threads started before keep their arenas). Returns False where it is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(libc.mallopt(M_ARENA_MAX, 1))


def release_free_heap() -> None:
    """Return the heap's free pages to the OS (``malloc_trim(0)``, ~1 ms); nothing outside glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
