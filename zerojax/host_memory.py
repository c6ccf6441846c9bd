"""Hand memory the XLA compiler freed back to the operating system.

Compiling a step allocates and frees a few hundred MB through glibc's malloc, which keeps
freed pages for reuse; the step's own buffers then land on fresh pages, so peak RSS is
compile + step rather than the larger of the two. `malloc_trim(0)` returns the free pages
(benchmarks/NOTES.md has the measured effect). Elsewhere than glibc this is a no-op.
"""
from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed() -> None:
    """Return free heap pages to the OS (milliseconds; call after a compile, not per step)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
