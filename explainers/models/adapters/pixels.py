"""Pixel-to-grid maps: which decoder position each value of ``pixel_values`` feeds.

Explainers that work in pixel space (gradients, occlusion) pool onto the adapters' grids with
these maps: scatter-add pixel scores by position, then ``PatchGrid.gather``. The helpers here
are family-independent; each adapter's ``pixel_cell_map`` composes them from its config,
processor outputs and layouts.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import AdapterError
from ..layout import ImageLayout

NO_CELL = -1
"""Map value of a pixel that no grid cell covers (padding, cropped margins, newline tokens)."""


def block_map(height: int, width: int, cells: torch.Tensor, block_h: int, block_w: int) -> torch.Tensor:
    """A ``(height, width)`` map: pixel (y, x) gets ``cells[y // block_h, x // block_w]``.

    ``cells`` is a ``(rows, cols)`` LongTensor of positions (or -1); pixels beyond
    ``rows * block_h`` or ``cols * block_w`` (left over by a strided patch embedding) get -1.
    """
    rows, cols = cells.shape
    if block_h <= 0 or block_w <= 0:
        raise AdapterError(f"pixel block of {block_h}x{block_w} pixels is empty")
    out = torch.full((height, width), NO_CELL, dtype=torch.long)
    used_h, used_w = min(height, rows * block_h), min(width, cols * block_w)
    ys = torch.arange(used_h) // block_h
    xs = torch.arange(used_w) // block_w
    out[:used_h, :used_w] = cells[ys][:, xs]
    return out


def grid_cells(layout_grid: Any) -> torch.Tensor:
    """A grid's positions as a ``(rows, cols)`` LongTensor."""
    return layout_grid.positions.view(layout_grid.rows, layout_grid.cols)


def expand_channels(maps: torch.Tensor, shape: torch.Size, channel_dims: tuple[int, ...]) -> torch.Tensor:
    """``maps`` (``shape`` without ``channel_dims``) broadcast over those dims, as a view."""
    for dim in sorted(channel_dims):
        maps = maps.unsqueeze(dim)
    return maps.expand(shape)


def batch_layouts(adapter: Any, inputs: Mapping[str, Any]) -> list[list[ImageLayout]]:
    """Per batch row, the row's image layouts (positions are within that row)."""
    rows = adapter._input_ids(inputs).shape[0]
    return [adapter.image_layouts(inputs, row) for row in range(rows)]


def flat_layouts(adapter: Any, inputs: Mapping[str, Any]) -> list[ImageLayout]:
    """Every image's layout in batch order: the order in which processors stack images."""
    return [layout for row in batch_layouts(adapter, inputs) for layout in row]


def patch_map(pixel_map: torch.Tensor, patch: int) -> torch.Tensor:
    """``(N, H, W)`` pixel map -> ``(N, (H // patch) * (W // patch))``, one value per patch, row-major.

    A patch takes the largest value among its pixels: all its covered pixels share one
    position, and -1 only wins where none of them is covered.
    """
    n, height, width = pixel_map.shape
    rows, cols = height // patch, width // patch
    cropped = pixel_map[:, : rows * patch, : cols * patch]
    blocks = cropped.reshape(n, rows, patch, cols, patch)
    return blocks.amax(dim=(2, 4)).reshape(n, rows * cols)


def check_pixels(pixels: torch.Tensor | None, dims: tuple[int, ...], family: str) -> torch.Tensor:
    """``pixel_values`` as a tensor with one of the expected numbers of dimensions."""
    if pixels is None:
        raise AdapterError(f"{family}: inputs have no 'pixel_values' to map")
    if pixels.dim() not in dims:
        raise AdapterError(f"{family}: pixel_values of shape {tuple(pixels.shape)}; expected {dims} dimensions")
    return pixels


def with_leading_tokens(patches: torch.Tensor, count: int) -> torch.Tensor:
    """``(N, P)`` patch positions with ``count`` uncovered tokens (-1) put before each view's patches."""
    lead = torch.full((patches.shape[0], count), NO_CELL, dtype=patches.dtype, device=patches.device)
    return torch.cat([lead, patches], dim=1)


def single_view_map(adapter: Any, inputs: Mapping[str, Any], family: str, cell_pixels: int) -> torch.Tensor:
    """``(N, C, H, W)`` pixel_values, one vision input per layout, each with one grid whose cells
    are ``cell_pixels`` square (LLaVA, PaliGemma: the patch; Gemma 3: the pooled block)."""
    values = check_pixels(inputs.get("pixel_values"), (4,), family)
    layouts = flat_layouts(adapter, inputs)
    if len(layouts) != values.shape[0]:
        raise AdapterError(f"{family}: {values.shape[0]} vision inputs but {len(layouts)} image layouts")
    height, width = values.shape[-2:]
    maps = []
    for layout in layouts:
        (grid,) = layout.grids
        if (grid.rows, grid.cols) != (height // cell_pixels, width // cell_pixels):
            raise AdapterError(
                f"{family}: a {grid.rows}x{grid.cols} grid does not tile {height}x{width} pixels in "
                f"{cell_pixels}-pixel cells"
            )
        maps.append(block_map(height, width, grid_cells(grid), cell_pixels, cell_pixels))
    return expand_channels(torch.stack(maps).to(values.device), values.shape, (1,))


def check_crop_count(adapter: Any, inputs: Mapping[str, Any], crops_in_row: Any, per_crop: int, cause: str) -> None:
    """Tiled families: the crops the sequence's image tokens account for (``crops_in_row(row)``, each
    of ``per_crop`` tokens) must be the crops in ``pixel_values``, else a one-line error ending in
    ``cause``. Checked once per batch (the adapter remembers the batch), not once per row."""
    pixels = inputs.get("pixel_values")
    if pixels is None:
        return
    ids = adapter._input_ids(inputs)
    key = (ids.data_ptr(), tuple(ids.shape), tuple(pixels.shape))
    if getattr(adapter, "_crops_checked", None) == key:
        return
    counted = sum(crops_in_row(row) for row in range(ids.shape[0]))
    if counted != pixels.shape[0]:
        raise AdapterError(
            f"{adapter.model_type}: the image tokens make {counted} crops of {per_crop} tokens but "
            f"pixel_values holds {pixels.shape[0]}: {cause}"
        )
    adapter._crops_checked = key
