"""Giving freed memory back to the system.

After a burst (start-up, a sock_diag listing of every socket), CPython's and
glibc's allocators keep what was freed as heap the daemon holds: measured
with bench/heal.py on 128,000 followed sockets, RSS grew by 1-3 MiB with
each gauge check (+27.5 MiB after five) without this, and stayed flat
(+11 MiB) with it.

The daemon also runs on glibc's allocator rather than CPython's own
(`use_the_system_allocator`): CPython's gives an arena (1 MiB) back only
once every object in it is freed, and the few objects that outlive a
listing (a heal's new snapshot, a cache entry) are spread through the
arenas its hundreds of thousands of transient objects filled. With 108,000
sockets that kept 7-10 MiB that nothing used; glibc's allocator returns
every free page at malloc_trim (README, "Footprint").
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import sys

ALLOCATOR_VARIABLE = "PYTHONMALLOC"


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


def release_freed_memory() -> None:
    """Collect cycles, then have glibc return its free pages (malloc_trim:
    a few milliseconds). Elsewhere than glibc, nothing to do."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        _libc().malloc_trim(0)


def use_the_system_allocator() -> None:
    """Run this process again, the same pid and command line, on glibc's
    allocator (PYTHONMALLOC=malloc), unless it already does or the user
    chose an allocator: call it before the process starts any work. If it
    cannot be run again, it goes on as it is."""
    if ALLOCATOR_VARIABLE in os.environ or not sys.executable or not sys.orig_argv:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    environment = {**os.environ, ALLOCATOR_VARIABLE: "malloc"}
    with contextlib.suppress(OSError):
        os.execve(sys.executable, sys.orig_argv, environment)  # noqa: S606 (our own command line)
