"""This process's memory as the operating system counts it (Linux; None elsewhere)."""

from __future__ import annotations

import os

try:
    import resource
except ImportError:  # not on Windows
    resource = None


def resident() -> int | None:
    """Bytes of this process's resident set now."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak() -> int | None:
    """Bytes of this process's largest resident set so far."""
    if resource is None or resident() is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
