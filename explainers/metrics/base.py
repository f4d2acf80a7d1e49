"""Metrics are classes registered by name (Quantus-style): metadata as class attributes, one
method to override.

A metric scores maps: ``compute(maps, inputs)`` returns one value per map. Localisation
metrics compare a map with the sample's ground-truth cells and override ``score`` instead;
model metrics (deletion, insertion) run real forwards through the :class:`MetricInputs`.
The metadata says how to read a value (``higher_is_better``), what it applies to
(``applies_to``: ``"image_map"``, a ``(rows, cols)`` map over the first image's main grid) and
whether it needs the model (``needs_model``), so tables and pages render any metric generically.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from .maps import MetricError

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.metrics.inputs import MetricInputs

IMAGE_MAP = "image_map"
"""A ``(rows, cols)`` map over the first image's main grid (see xmllm.explainers.models.layout)."""


class Metric:
    """Base class: subclasses set the metadata and override :meth:`compute` (or ``score``)."""

    name: ClassVar[str]
    title: ClassVar[str]
    higher_is_better: ClassVar[bool]
    applies_to: ClassVar[str] = IMAGE_MAP
    needs_model: ClassVar[bool] = False
    needs_truth: ClassVar[bool] = False
    """Whether the metric needs ground-truth cells (a sample without them scores NaN)."""
    summary: ClassVar[str] = ""
    reference: ClassVar[str] = ""

    def compute(self, maps: Sequence[np.ndarray], inputs: "MetricInputs") -> np.ndarray:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} does not implement compute()")

    @classmethod
    def describe(cls) -> dict[str, object]:
        """The metadata as JSON-ready data (for tables, pages and the evaluation's JSON)."""
        return {
            "name": cls.name,
            "title": cls.title,
            "higher_is_better": cls.higher_is_better,
            "applies_to": cls.applies_to,
            "needs_model": cls.needs_model,
            "needs_truth": cls.needs_truth,
            "summary": cls.summary,
            "reference": cls.reference,
        }


_METRICS: dict[str, type[Metric]] = {}


def register_metric(cls: type[Metric]) -> type[Metric]:
    """Class decorator: add ``cls`` to the registry under ``cls.name``."""
    for attr in ("name", "title"):
        if not isinstance(getattr(cls, attr, None), str) or not getattr(cls, attr):
            raise MetricError(f"metric class {cls.__name__} must set a non-empty {attr!r}")
    if not isinstance(getattr(cls, "higher_is_better", None), bool):
        raise MetricError(f"metric {cls.name}: higher_is_better must be True or False")
    existing = _METRICS.get(cls.name)
    if existing is not None and existing is not cls:
        raise MetricError(f"metric name {cls.name!r} is already registered by {existing.__name__}")
    _METRICS[cls.name] = cls
    return cls


def registered_metrics() -> dict[str, type[Metric]]:
    """Every registered metric by name: those of the map alone first, then those that run the
    model, each group in registration order (the order tables use). The package imports every
    metric module, so all are registered before anything of it runs."""
    ordered = sorted(enumerate(_METRICS.items()), key=lambda item: (item[1][1].needs_model, item[0]))
    return {name: cls for _, (name, cls) in ordered}


def get_metric(name: str) -> type[Metric]:
    table = registered_metrics()
    if name not in table:
        raise MetricError(f"unknown metric {name!r}; choose from {', '.join(table)}")
    return table[name]
