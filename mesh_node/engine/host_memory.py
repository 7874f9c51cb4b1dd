"""Giving freed memory back to the operating system.

torch frees a tensor's bytes to the C allocator, and glibc's malloc keeps freed heap memory
for reuse instead of returning it: after a model (or an analysis run, or a reshuffle of
experts) is dropped, the process would still look as large as at its peak. Nodes report their
free memory to the mesh and plans are sized by it, so after dropping weights a node asks
malloc to trim (`malloc_trim(0)`, glibc only; elsewhere this only collects garbage).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_free_memory() -> None:
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
