"""Errors that the command line turns into exit codes, and how messages name several things."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: the message names the problem and the fix (exit code 2)."""


def some_names(names: list[str], shown: int = 3) -> str:
    """``names`` joined, the first ``shown`` of a longer list and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
