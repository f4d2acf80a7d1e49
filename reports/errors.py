"""The one error type the command line turns into a one-line message and a non-zero exit."""
from __future__ import annotations


class XmllmError(Exception):
    """A user-facing failure: its message is one line naming the file, field or value at fault."""

    exit_code: int = 2
