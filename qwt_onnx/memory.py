"""This process's memory as the operating system counts it."""

from __future__ import annotations

import os
import sys

try:
    import resource
except ImportError:  # not on Windows
    resource = None


def unused_peak() -> int:
    """Bytes between this process's peak resident set and its current one: memory it has already
    held and can hold again without raising its peak (0 where the platform does not say)."""
    current = _resident()
    if resource is None or current is None:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return max(peak - current, 0)


def _resident() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
