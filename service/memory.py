"""Give the heap pages that a burst of work freed back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:
    """glibc's malloc_trim, where the C library has it."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def trim_heap() -> bool:
    """Return free heap memory to the system; whether the C library could.

    glibc keeps the pages of freed tensors in its heaps for reuse, so a process that decoded a large batch keeps
    its peak size after it (hundreds of megabytes here) unless asked; the call walks the heaps (a few
    milliseconds), so it is for idle moments, not for every request."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
