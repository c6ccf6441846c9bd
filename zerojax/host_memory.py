"""How the process's glibc malloc serves XLA:CPU.

Compiling a step allocates and frees a few hundred MB through glibc's malloc, which keeps
freed pages for reuse; the step's own buffers then land on fresh pages, so peak RSS is
compile + step rather than the larger of the two. `malloc_trim(0)` returns the free pages
(benchmarks/NOTES.md has the measured effect). Elsewhere than glibc this is a no-op.

Each execution of a compiled step allocates its temp buffer (tens to hundreds of MB) and
frees it at the end. glibc serves that size with a fresh `mmap` and returns it with
`munmap`, so every step touches every page of it anew: the benchmark GPT at 1 x 2 took
43,000 page faults per step (170 MB) and ~50 ms of its ~470 ms in the kernel. Keeping the
memory in malloc's heap instead raised peak RSS by 150 MB; transparent huge pages fault
it 2 MB at a time (900 faults per step) at no memory cost. glibc >= 2.35 asks for them when
started with `glibc.malloc.hugetlb=1` in GLIBC_TUNABLES, which is read only at process
start: `with_huge_pages` adds it to a child's environment (`zerojax launch`, `zerojax train`
re-executing itself), and a library caller sets it in the shell.
"""
from __future__ import annotations

import ctypes
import functools
import os
from typing import Mapping

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


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


def huge_pages_available() -> bool:
    """Transparent huge pages can be asked for (kernel mode "madvise" or "always") and the
    C library is glibc >= 2.35, which knows the tunable."""
    try:
        with open(_THP_MODE) as f:
            mode = f.read()
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (OSError, ValueError, AttributeError):
        return False
    chosen = mode[mode.index("[") + 1:mode.index("]")] if "[" in mode else ""
    major, minor = (int(x) for x in version.split(".")[:2])
    return name == "glibc" and (major, minor) >= (2, 35) and chosen in ("madvise", "always")


def asks_for_huge_pages(env: Mapping[str, str]) -> bool:
    """Whether `env`'s GLIBC_TUNABLES sets the huge-page tunable (to any value)."""
    return any(t.split("=", 1)[0].strip() == HUGE_PAGES_TUNABLE
               for t in env.get("GLIBC_TUNABLES", "").split(":"))


def with_huge_pages(env: Mapping[str, str]) -> dict[str, str]:
    """`env` whose process will get malloc's large buffers on transparent huge pages; left
    as it is where they are unavailable or `env` already sets the tunable (the user's
    choice, 0 included)."""
    env = dict(env)
    if huge_pages_available() and not asks_for_huge_pages(env):
        tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
        env["GLIBC_TUNABLES"] = ":".join(tunables + [f"{HUGE_PAGES_TUNABLE}=1"])
    return env
