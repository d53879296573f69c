"""The one decision on freed CPU memory in a long-lived server: keep it in the process for reuse.

torch allocates CPU tensors with the C library's ``malloc``. glibc, by default, serves a block
above its mmap threshold (128 KiB, rising to 32 MiB as large blocks are freed) with a mapping of
its own and unmaps it when it is freed, gives threads other than the main one arenas of their
own (heaps of 64 MiB: a larger block is always mapped there), and trims free space at the top
of its heap. A server frees and reallocates the same few hundred MiB burst after burst (a
prefill's activations, the stacked KV a join copies), so each burst asks the kernel for fresh
pages again. On this project's VM fresh pages are at times very slow to touch
(``lmref.serving.warm_up`` has the numbers): a block glibc gave back is fresh again at the next
burst. Measured in ``python -m lmref.serve`` (SmolLM2-135M, 64 clients, after the warm-up,
while fresh pages were slow), in pairs of runs: 501, 501 and 477 output tokens/s with these
settings against 498, 481 and 461 without.

``keep_freed_memory`` makes glibc keep what it freed: one arena for every thread, blocks under
1 GiB from the heap, and free space at the heap's top given back only past 2 GiB. The process's
resident memory then stays at its high-water mark, as a GPU server's does (vLLM holds its KV
cache for the process's life; PyTorch's CUDA allocator caches freed blocks). Called once by
each process that runs the engine, before its threads start: the server's
(``python -m lmref.serve``) and each pool process of a Batch worker
(``lmref.production.worker``). A library imported into someone's notebook does not change
their allocator. A C library other than glibc (musl, macOS):
nothing is changed, and it says so.

Usage::

    from lmref.core.allocator import keep_freed_memory

    keep_freed_memory()   # True when glibc took the settings
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("lmref.core.allocator")

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
KEEP_BELOW_BYTES = 1 << 30  # blocks smaller than this come from the heap and stay there
TRIM_ABOVE_BYTES = (1 << 31) - 1  # free space at the heap's top kept up to this (an int)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in this process for reuse; False (and a log line) when the
    C library is not glibc or refuses a setting."""
    name = ctypes.util.find_library("c")
    # name None (not found): on Linux CDLL(None) is the process's own symbols, glibc's among
    # them; on Windows it raises TypeError. OSError: a library that cannot be loaded.
    try:
        libc = ctypes.CDLL(name)
    except (OSError, TypeError):
        libc = None
    # musl has a mallopt that ignores everything: glibc is told apart by a function of its own.
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
        log.info("freed memory goes back to the system: %s has no glibc mallopt", name)
        return False
    mallopt = libc.mallopt
    settings = {
        "M_ARENA_MAX": (_M_ARENA_MAX, 1),  # the engine thread allocates from the main heap too
        "M_MMAP_THRESHOLD": (_M_MMAP_THRESHOLD, KEEP_BELOW_BYTES),
        "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, TRIM_ABOVE_BYTES),
    }
    refused = [key for key, (param, value) in settings.items() if mallopt(param, value) != 1]
    if refused:
        log.warning("glibc refused %s: freed memory may go back to the system", refused)
    return not refused
