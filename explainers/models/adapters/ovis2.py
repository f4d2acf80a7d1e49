"""Ovis2: an image is a thumbnail and, past one tile, its tiles (row-major over a canvas of
``rows x cols`` tiles of the vision encoder's size); each crop's patch grid is padded to whole
``hidden_stride`` blocks and each block becomes one visual token (a softmax over a visual
vocabulary, embedded by a table). The processor frames an image as
``<IMG_START> thumbnail <IMG_GRID> tile <IMG_COL> tile ... <IMG_ROW> ... <IMG_END>``; those
indicator tokens (the config's ``visual_indicator_token_ids``) get embeddings of their own from the
visual table: markers, not features. The canvas is read off the sequence (one ``<IMG_ROW>``
between rows), so each tile's region is known without the image's size.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import AdapterError
from ..layout import FULL_IMAGE, Region
from . import pixels as px
from .base import GridPlan, ImagePlan, ModelAdapter, _tensor, register_adapter

IMAGE_START, ROW_BREAK = "<IMG_START>", "<IMG_ROW>"
"""The markup Ovis2Processor writes around an image and between rows of tiles."""
GLOBAL = "global"


@register_adapter
class Ovis2Adapter(ModelAdapter):
    """Ovis2: grids ``global`` (the thumbnail) then ``tile_{r}_{c}`` (1-based); an image that fits
    one tile is one grid ``image``."""

    model_types = ("ovis2",)
    family = "Ovis2"

    vision_layers_candidates = ("transformer.encoder.layers",)
    vision_attn_candidates = ("attention",)
    projector_path = "model.visual_embeddings_table"

    def _stride(self) -> int:
        return int(getattr(self.config.vision_config, "hidden_stride", 1) or 1)

    def _crop_side(self) -> int:
        """Visual tokens per side of one crop: its patches, padded to whole ``hidden_stride`` blocks."""
        vision = self.config.vision_config
        return math.ceil(int(vision.image_size) // int(vision.patch_size) / self._stride())

    def _indicator(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if not isinstance(token_id, int) or token_id not in self._marker_ids({}, 0):
            raise AdapterError(f"{self.model_type}: {token} is not one of the config's visual indicator tokens")
        return token_id

    def _marker_ids(self, inputs: Mapping[str, Any], row: int) -> set[int]:
        return {int(i) for i in getattr(self.config, "visual_indicator_token_ids", ()) or ()}

    def _canvases(self, inputs: Mapping[str, Any], row: int) -> list[tuple[int, int]]:
        """(rows, cols) of tiles of each image of batch row ``row`` ((0, 0): the thumbnail alone)."""
        ids = self._input_ids(inputs)[row]
        is_image = ids == self.image_token_id
        if not bool(is_image.any()):
            return []
        starts = torch.nonzero(ids == self._indicator(IMAGE_START)).flatten().tolist()
        row_break = self._indicator(ROW_BREAK)
        per_crop = self._crop_side() ** 2
        bounds = [*starts, ids.numel()]
        canvases = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            crops, remainder = divmod(int(is_image[a:b].sum()), per_crop)
            if remainder or not crops:
                raise AdapterError(f"{self.model_type}: an image's tokens of row {row} are not whole crops of {per_crop}")
            tiles = crops - 1
            rows = int((ids[a:b] == row_break).sum()) + 1 if tiles else 0
            if tiles % max(rows, 1):
                raise AdapterError(f"{self.model_type}: {tiles} tiles do not fill {rows} rows")
            canvases.append((rows, tiles // rows if rows else 0))
        if int(is_image[: bounds[0]].sum()):
            raise AdapterError(f"{self.model_type}: image tokens of row {row} before any {IMAGE_START}")
        return canvases

    def _check_crops(self, inputs: Mapping[str, Any]) -> None:
        """The crops the sequence's image tokens account for must be the crops in pixel_values."""
        px.check_crop_count(self, inputs, lambda row: sum(1 + r * c for r, c in self._canvases(inputs, row)),
                            self._crop_side() ** 2, "the processor's image_seq_length is not the vision config's")

    def _row_plans(self, inputs: Mapping[str, Any], row: int) -> list[ImagePlan]:
        self._check_crops(inputs)
        side = self._crop_side()
        plans = []
        for rows, cols in self._canvases(inputs, row):
            if not rows:
                plans.append(ImagePlan((GridPlan("image", side, side),)))
                continue
            tiles = tuple(
                GridPlan(f"tile_{r + 1}_{c + 1}", side, side, (r / rows, c / cols, (r + 1) / rows, (c + 1) / cols))
                for r in range(rows)
                for c in range(cols)
            )
            plans.append(ImagePlan((GridPlan(GLOBAL, side, side, FULL_IMAGE), *tiles)))
        return plans

    def _batch_plans(self, inputs: Mapping[str, Any]) -> list[ImagePlan]:
        rows = self._input_ids(inputs).shape[0]
        return [plan for row in range(rows) for plan in self._row_plans(inputs, row)]

    def pixel_cell_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Crop ``i`` of ``pixel_values`` feeds the ``i``-th grid in batch order (each image's
        thumbnail, then its tiles); each ``patch x hidden_stride`` square maps to its token, the
        last row and column of tokens covering what is left of the crop."""
        values = px.check_pixels(_tensor(inputs, "pixel_values"), (4,), self.model_type)
        grids = [grid for layout in px.flat_layouts(self, inputs) for grid in layout.grids]
        if len(grids) != values.shape[0]:
            raise AdapterError(f"{self.model_type}: {values.shape[0]} crops in pixel_values, {len(grids)} grids")
        cell = self.patch_size * self._stride()
        height, width = values.shape[-2:]
        maps = [px.block_map(height, width, px.grid_cells(grid), cell, cell) for grid in grids]
        return px.expand_channels(torch.stack(maps).to(values.device), values.shape, (1,))

    def _grid_region(self, grid: GridPlan, image_size: tuple[int, int]) -> Region | None:
        return grid.region  # the canvas is read off the sequence: regions need no image size
