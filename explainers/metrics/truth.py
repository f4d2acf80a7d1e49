"""Ground truth on the patch grid: which cells show the objects an answer depends on.

A sample's mask (``ExplainSample.mask``, bool ``H x W`` over the scored picture's pixels: the first
image's, or with several pictures the ``evidence_image``'s; see :func:`~xmllm.explainers.masking.scored_picture`) goes
through the model's own processor as a white-on-black image, so it is resized, cropped, padded
and tiled exactly as the image was; the adapter's ``pixel_cell_map`` then says which grid cell
each processed pixel value feeds. A cell's *cover* is the share of its pixel values that show
the mask; a cell is ground truth when its cover reaches :data:`MIN_COVER`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from xmllm.explainers.masking import cell_map, scored_layout, scored_picture

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.prepared import Prepared

MIN_COVER = 0.1
"""Share of a cell's pixels that must show a grounding object for the cell to count: below it
is an anti-aliased edge or a corner sliver the patch barely sees. Demo objects (22-32 px sides,
16 px cells) always leave at least one cell above it; if a mask leaves none, the cells of
largest cover count, so a non-empty mask never gives empty ground truth."""
HALF = 0.5
"""A processed mask value counts as inside when it is at least half-way from black to white."""


@dataclass(frozen=True)
class CellTruth:
    """Per cell of the main grid: the share covered by the mask, and whether it counts."""

    cover: np.ndarray
    cells: np.ndarray

    @property
    def empty(self) -> bool:
        return not bool(self.cells.any())


def processed_pixels(prepared: "Prepared", image: Image.Image, picture: int = 0) -> torch.Tensor:
    """``pixel_values`` of the sample with its picture ``picture`` replaced, through the model's processor."""
    images = list(prepared.sample.images)
    images[picture] = image
    inputs, _ = prepared.adapter.build_inputs(images, prepared.sample.question)
    pixels = prepared.inputs["pixel_values"]
    out = inputs["pixel_values"].to(device=pixels.device, dtype=torch.float32)
    if tuple(out.shape) != tuple(pixels.shape):
        raise ValueError(f"sample {prepared.sample.id!r}: the processed mask has shape {tuple(out.shape)}, "
                         f"the image {tuple(pixels.shape)}")
    return out


def processed_mask(prepared: "Prepared", mask: np.ndarray) -> torch.Tensor:
    """Bool, shaped like ``pixel_values``: which processed values show the mask."""
    k = scored_picture(prepared)
    size = prepared.sample.images[k].size
    as_image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), "L").convert("RGB")
    black = processed_pixels(prepared, Image.new("RGB", size, (0, 0, 0)), k)
    white = processed_pixels(prepared, Image.new("RGB", size, (255, 255, 255)), k)
    shown = processed_pixels(prepared, as_image, k)
    span = white - black
    moving = span.abs() > 1e-6  # padding stays put whatever the image shows
    return moving & ((shown - black) >= HALF * span)


def cell_truth(prepared: "Prepared", mask: np.ndarray | None = None, min_cover: float = MIN_COVER) -> CellTruth | None:
    """The ground-truth cells of the scored picture's main grid, or None for a sample without a mask."""
    mask = prepared.sample.mask if mask is None else mask
    if mask is None:
        return None
    mask = np.asarray(mask).astype(bool)
    image = prepared.sample.images[scored_picture(prepared)]
    if mask.shape != (image.height, image.width):
        raise ValueError(f"sample {prepared.sample.id!r}: mask of shape {mask.shape} does not match the "
                         f"image's {image.height}x{image.width} pixels")
    grid = scored_layout(prepared).main_grid
    if not mask.any():
        zeros = np.zeros((grid.rows, grid.cols))
        return CellTruth(zeros, zeros.astype(bool))
    mapping = cell_map(prepared).reshape(-1)
    inside = processed_mask(prepared, mask).reshape(-1).to(mapping.device)
    keep = mapping >= 0
    index = mapping[keep]
    length = max(prepared.seq_len, int(index.max()) + 1)
    counts = torch.zeros(length, dtype=torch.float64, device=mapping.device).index_add_(
        0, index, torch.ones_like(index, dtype=torch.float64))
    hits = torch.zeros(length, dtype=torch.float64, device=mapping.device).index_add_(
        0, index, inside[keep].double())
    cover = grid.gather((hits / counts.clamp_min(1.0)).cpu()).numpy()
    cells = cover >= min_cover
    if not cells.any() and cover.max() > 0:
        cells = cover == cover.max()
    return CellTruth(cover, cells)
