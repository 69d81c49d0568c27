"""Errors that the command line turns into exit codes."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: the message names the problem and the fix (exit code 2)."""
