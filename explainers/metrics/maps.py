"""Which map of an explanation the metrics score, the check every scored map passes, and the
random maps that give each metric a floor.

An explainer may return many image maps (per answer token, per layer and head, per grid). The
one scored is the whole answer's map over the first image's main grid: ``image.answer`` when
the explainer gives it, else ``image`` with every leading axis (answer token, layer, head)
averaged away. Every explainer here follows that naming (see xmllm.explainers.explanation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..explanation import Explanation

ANSWER_MAP = "image.answer"
IMAGE_MAP = "image"
GRID_AXES = ("row", "col")
RANDOM = "random"
"""Label of the random-map floor in tables and JSON."""


class MetricError(ValueError):
    """A registration, look-up or input that cannot be honoured; the message is one line."""


def check_map(map2d: np.ndarray, shape: tuple[int, int], what: str = "map") -> np.ndarray:
    """``map2d`` as a float64 ``(rows, cols)`` array of the grid's shape; one-line errors otherwise."""
    arr = np.asarray(map2d, dtype=np.float64)
    if arr.shape != tuple(shape):
        raise MetricError(f"{what} of shape {arr.shape} does not match the {shape[0]}x{shape[1]} image grid")
    return arr


@dataclass(frozen=True)
class ScoredMap:
    """The map an explanation is scored by, where it came from and how it was reduced."""

    name: str
    values: np.ndarray
    reduced: tuple[str, ...] = ()
    """Axes averaged away (empty when the map is already ``(row, col)``)."""

    def describe(self) -> str:
        return self.name if not self.reduced else f"{self.name}, mean over {', '.join(self.reduced)}"


def primary_image_map(explanation: "Explanation", grid: str = IMAGE_MAP) -> ScoredMap | None:
    """The whole answer's ``(rows, cols)`` map of the first image's main grid, or None; ``grid``
    names another picture's main-grid map (``image1.image``: the scored picture of
    :func:`~xmllm.explainers.masking.scored_map_name`)."""
    for name in (grid + ANSWER_MAP[len(IMAGE_MAP):], grid):
        if name not in explanation.maps:
            continue
        axes = tuple(explanation.axes[name])
        if axes[-2:] != GRID_AXES:
            continue
        values = np.asarray(explanation.maps[name], dtype=np.float64)
        lead = tuple(range(values.ndim - 2))
        return ScoredMap(name, values.mean(axis=lead) if lead else values, axes[:-2])
    return None


def random_map(shape: tuple[int, int], seed: int | np.random.Generator) -> np.ndarray:
    """Uniform random relevance over the grid: the map every metric's floor is measured with."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng([int(seed), 0x5A17])
    return rng.random(shape)
