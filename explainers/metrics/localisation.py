"""Localisation metrics: does a map put its relevance on the objects the answer depends on?

Formulas as in Quantus (see /work/shared/reference/anchors.md), on the cells of the image's
main grid, the ground truth being the cells a grounding object covers (see :mod:`.truth`).
Relevance is the map's value with its sign: every explainer here makes larger mean "more
support for the answer". Ties are resolved by expectation over a random tie-break, so a
constant map scores what a random map scores instead of whatever cell happens to come first:

* pointing game: the share of the map's maximal cells that lie in the mask (1 or 0 when the
  maximum is unique: Quantus's "hit if the argmax falls inside the mask");
* relevance mass: positive relevance inside the mask over all positive relevance (negative
  values are evidence against the answer, not mass anywhere); NaN for a map with none;
* relevance rank: ``|top-K(map) within mask| / |mask|`` with ``K = |mask|``; cells tied with
  the K-th value share the remaining slots in proportion.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from .base import Metric, register_metric
from .maps import MetricError

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.metrics.inputs import MetricInputs

QUANTUS = "Quantus (Hedström et al., 2023, arXiv 2202.06861)"


def _inputs(map2d: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(map2d, dtype=np.float64).ravel()
    truth = np.asarray(mask, dtype=bool).ravel()
    if values.shape != truth.shape:
        raise MetricError(f"map of shape {np.shape(map2d)} and mask of shape {np.shape(mask)} differ")
    return values, truth


def pointing_game(map2d: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's maximal cells inside ``mask`` (a hit is 1.0 when the maximum is unique)."""
    values, truth = _inputs(map2d, mask)
    if not truth.any() or not np.isfinite(values).all():
        return float("nan")
    top = values == values.max()
    return float(truth[top].mean())


def relevance_mass(map2d: np.ndarray, mask: np.ndarray) -> float:
    """Positive relevance inside ``mask`` over all positive relevance."""
    values, truth = _inputs(map2d, mask)
    if not truth.any() or not np.isfinite(values).all():
        return float("nan")
    positive = np.clip(values, 0.0, None)
    total = positive.sum()
    return float(positive[truth].sum() / total) if total > 0 else float("nan")


def relevance_rank(map2d: np.ndarray, mask: np.ndarray) -> float:
    """``|top-K(map) within mask| / |mask|``, ``K = |mask|``, ties at the K-th value shared out."""
    values, truth = _inputs(map2d, mask)
    k = int(truth.sum())
    if k == 0 or not np.isfinite(values).all():
        return float("nan")
    kth = np.sort(values)[::-1][k - 1]
    above = values > kth
    tied = values == kth
    slots = k - int(above.sum())
    inside = float((above & truth).sum()) + slots * float((tied & truth).sum()) / float(tied.sum())
    return inside / k


class LocalisationMetric(Metric):
    """A metric of one map against the ground-truth cells: override :meth:`score`."""

    needs_truth = True

    def score(self, map2d: np.ndarray, mask: np.ndarray) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute(self, maps: Sequence[np.ndarray], inputs: "MetricInputs") -> np.ndarray:
        truth = inputs.truth_cells()
        if truth is None or not truth.any():
            return np.full(len(maps), np.nan)
        return np.array([self.score(m, truth) for m in maps], dtype=np.float64)


@register_metric
class PointingGame(LocalisationMetric):
    name = "pointing_game"
    title = "Pointing game"
    higher_is_better = True
    summary = "Hit if the map's most relevant cell lies on a grounding object (ties: the share of tied cells on it)."
    reference = QUANTUS
    formula: ClassVar[str] = "hit = mask[argmax(map)]"

    def score(self, map2d, mask):
        return pointing_game(map2d, mask)


@register_metric
class RelevanceMass(LocalisationMetric):
    name = "relevance_mass"
    title = "Relevance mass"
    higher_is_better = True
    summary = "Positive relevance on the grounding objects' cells over all positive relevance."
    reference = QUANTUS
    formula: ClassVar[str] = "sum(map+ in mask) / sum(map+)"

    def score(self, map2d, mask):
        return relevance_mass(map2d, mask)


@register_metric
class RelevanceRank(LocalisationMetric):
    name = "relevance_rank"
    title = "Relevance rank"
    higher_is_better = True
    summary = "Share of the K most relevant cells on the grounding objects, K the number of object cells."
    reference = QUANTUS
    formula: ClassVar[str] = "|top-K(map) within mask| / |mask|, K = |mask|"

    def score(self, map2d, mask):
        return relevance_rank(map2d, mask)
