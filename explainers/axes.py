"""Names for the indices of an explanation's axes, in the ``meta`` entries the reports read.

An array's axes are named by :meth:`~xmllm.explainers.explanation.Explanation.add`; what each index
along an axis stands for (an edit, a window of layers, a component) is meta, written the same
way by every explainer that labels its axes, so a report labels any of them alike.
"""
from __future__ import annotations

from typing import Any


def axis_labels(labels: dict[str, list[Any]]) -> dict[str, Any]:
    """Meta entries naming each index of the given axes: ``axis_labels`` (all axes) and the flat
    ``<axis>_labels`` keys reports read (``layers`` for the layer axis)."""
    flat = {("layers" if axis == "layer" else f"{axis}_labels"): list(values) for axis, values in labels.items()}
    return {"axis_labels": {axis: [str(v) for v in values] for axis, values in labels.items()}, **flat}


__all__ = ["axis_labels"]
