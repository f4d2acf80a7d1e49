"""The one error type for user-facing failures, shared by every layer.

It lives in the core so that explainers, models and the catalog raise it without depending on
the command line; only the CLI decides what a failure means for the process (exit status 2).
"""
from __future__ import annotations


class XmllmError(Exception):
    """A user-facing failure: its message is one line naming the file, field or value at fault."""


class MissingInput(XmllmError, ValueError):
    """An explainer cannot run on this sample (no ground truth, no second checkpoint, a contrast
    it does not explain): raised before any model work; a run of several explainers skips it
    with this message instead."""
