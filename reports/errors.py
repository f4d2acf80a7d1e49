"""The one error type for user-facing failures, shared by every layer.

It lives in the root package, below every layer, so that explainers, models, the catalog and the
application raise it alike; only the CLI decides what a failure means for the process: an
``XmllmError`` is exit status 2 with its one line, anything else a bug with its traceback.
"""
from __future__ import annotations


class XmllmError(Exception):
    """A user-facing failure: its message is one line naming the file, field or value at fault."""


class MissingInput(XmllmError, ValueError):
    """An explainer cannot run on this sample (no ground truth, no second checkpoint, a contrast
    it does not explain): raised before any model work; a run of several explainers skips it
    with this message instead."""
