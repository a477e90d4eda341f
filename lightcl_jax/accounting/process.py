"""What the running process holds: its peak resident memory, as the operating system counts it."""

from __future__ import annotations

import ctypes
import resource
import sys


def peak_rss_mb() -> float:
    """The peak resident set size of this process so far, in MiB (``getrusage``'s ``ru_maxrss``).

    Everything the process holds counts: arrays, compiled programs, the Python
    interpreter and its libraries, the data in memory, allocator caches.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes.
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


# glibc's mallopt parameter for the number of malloc arenas.
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Caps glibc's malloc arenas at ``arenas`` for the threads created from now on.

    glibc gives threads their own arenas (up to 8 per core), and memory freed in
    one stays with it; JAX's and XLA's threads then hold more resident memory
    than they use. Capped at 2 before JAX started, a Split Digits 32x32 (nf 64)
    LightCL run peaked 48 MB lower here with the same results (`experiments.bench_rss`;
    BUILD.md, "Memory a process holds"). The experiment scripts call it first; call it
    before importing JAX. Returns whether it applied (False where the C library is not
    glibc: it changes nothing there).
    """
    mallopt = _glibc("mallopt")
    return mallopt is not None and mallopt(_M_ARENA_MAX, arenas) == 1


def release_free_memory() -> bool:
    """Hands the C heap's free pages back to the operating system (glibc's ``malloc_trim``).

    Compiling a program (LLVM) allocates and frees a few hundred MB; glibc
    keeps the freed pages, and a step's large buffers, which glibc maps
    afresh, then come on top of them. Released after the initialisation
    and after each step's compilation, a Split Digits 32x32 (nf 64) LightCL
    run peaked at 665 MB instead of 779 (`experiments.bench_rss`). Costs a
    few milliseconds; changes no result. Returns whether it applied (False
    where the C library is not glibc).
    """
    trim = _glibc("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


def _glibc(name: str):
    """The C library's function ``name`` where it is glibc's (on Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
