"""Which picture carried the answer: each image's (or video frame's) share of an explanation's map.

An explainer that maps several images names its maps by grid (see
:func:`xmllm.explainers.models.layout.grid_names`): ``image`` for the first image's main grid,
``image{k}.{grid}`` for every other grid, each with the same suffixes (``image.answer`` and
``image1.image.answer``). The share of image k is the positive mass of its grids' maps over the
positive mass of all images' grids, on the same reduction the metrics score
(:func:`~xmllm.explainers.metrics.maps.primary_image_map`: the whole answer's map, leading axes
averaged). Positive mass: evidence for the answer; a signed map's negative cells argue against it
and are not a share of what carried it. Where no image's map has positive mass, there are no shares.

Layouts are given as the manifest records them (``[{"image": k, "grids": [{"map", "main"}]}]``), so a
saved run's shares are computed without the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .maps import ANSWER_MAP, GRID_AXES, IMAGE_MAP

if TYPE_CHECKING:  # pragma: no cover
    from ..explanation import Explanation


@dataclass(frozen=True)
class ImageShares:
    """Per image: its main grid's map (for a strip on one colour scale) and its share."""

    base: str
    """The map the shares are of (``image.answer`` or ``image``), as named for the first image."""
    maps: list[np.ndarray | None]
    """Each image's main-grid ``(rows, cols)`` map; None for an image the explainer did not map."""
    shares: list[float]
    reduced: tuple[str, ...] = ()

    @property
    def carrier(self) -> int:
        """The image with the largest share."""
        return int(np.argmax(self.shares))


def grid_map_name(base: str, grid_map: str) -> str:
    """The name of ``base``'s map for a grid whose plain map is ``grid_map`` (``image1.image``):
    ``image.answer`` -> ``image1.image.answer``."""
    return grid_map + base[len(IMAGE_MAP):]


def _reduce(values: Any, axes: tuple[str, ...]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    lead = tuple(range(arr.ndim - 2))
    return arr.mean(axis=lead) if lead else arr


def _base(exp: "Explanation") -> str | None:
    for name in (ANSWER_MAP, IMAGE_MAP):
        if name in exp.maps and tuple(exp.axes[name])[-2:] == GRID_AXES:
            return name
    return None


def image_shares(exp: "Explanation", layouts: list[dict[str, Any]] | None, images: int) -> ImageShares | None:
    """The shares of ``images`` pictures in ``exp``'s scored map; None with fewer than two images,
    no image map, an image the explainer did not map, or no positive mass anywhere."""
    base = _base(exp)
    if images < 2 or base is None or not layouts:
        return None
    mass = [0.0] * images
    mains: list[np.ndarray | None] = [None] * images
    reduced = tuple(exp.axes[base])[:-2]
    for layout in layouts:
        k = int(layout.get("image", -1))
        if not 0 <= k < images:
            continue
        for grid in layout.get("grids") or []:
            name = grid_map_name(base, str(grid.get("map", "")))
            if name not in exp.maps or tuple(exp.axes[name])[-2:] != GRID_AXES:
                continue
            values = _reduce(exp.maps[name], tuple(exp.axes[name]))
            finite = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
            mass[k] += float(np.clip(finite, 0.0, None).sum())
            if grid.get("main") or mains[k] is None:
                mains[k] = values
    total = sum(mass)
    if total <= 0.0 or any(m is None for m in mains):  # an image left unmapped has no share to compare
        return None
    return ImageShares(base, mains, [m / total for m in mass], reduced)
