"""What the running process holds: its peak resident memory, as the operating system counts it."""

from __future__ import annotations

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
