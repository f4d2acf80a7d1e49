"""HunYuan-VL: ``image_grid_thw`` gives each image's patch grid, ``pixel_values`` its patches
flattened in raster order; the merger convolves each ``spatial_merge_size`` x ``spatial_merge_size``
block (kernel = stride: no reach past the block) into one token, ends every merged row with a learned
newline feature and puts a learned begin and end feature around the image. All of them are written
over the image token, between the tokenizer's image start and end tokens (the markers)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..errors import AdapterError
from . import pixels as px
from .base import ExtraPlan, GridPlan, ImagePlan, ModelAdapter, _tensor, register_adapter

NEWLINE = "image_newline"
BEGIN = "image_begin"
END = "image_end"


@register_adapter
class HunYuanVLAdapter(ModelAdapter):
    """HunYuan-VL: begin feature, merged grid with a newline feature ending each row, end feature."""

    model_types = ("hunyuan_vl",)
    family = "HunYuan-VL"

    vision_tower_path = "model.vision_tower"
    projector_path = "model.vision_tower.patch_merger"

    def _merge(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def _grids(self, inputs: Mapping[str, Any]) -> list[tuple[int, int]]:
        """(patch rows, patch cols) of each image."""
        grid_thw = _tensor(inputs, "image_grid_thw")
        if grid_thw is None:
            if _tensor(inputs, "pixel_values") is not None:
                raise AdapterError(f"{self.model_type}: inputs have pixel_values but no image_grid_thw")
            return []
        grids = []
        for frames, height, width in grid_thw.tolist():
            if int(frames) != 1:
                raise AdapterError(f"{self.model_type}: an image of {frames} frames; its tower takes single images")
            grids.append((int(height), int(width)))
        return grids

    # Learned features the merger puts before and after each image's grid.
    begin_end_features: ClassVar[bool] = True

    def _batch_plans(self, inputs: Mapping[str, Any]) -> list[ImagePlan]:
        merge = self._merge()
        plans = []
        for height, width in self._grids(inputs):
            grid = GridPlan("image", height // merge, width // merge, row_suffix=NEWLINE)
            parts = (ExtraPlan(BEGIN, 1), grid, ExtraPlan(END, 1)) if self.begin_end_features else (grid,)
            plans.append(ImagePlan(parts))
        return plans

    def _marker_ids(self, inputs: Mapping[str, Any], row: int) -> set[int]:
        ids = (getattr(self.processor, "image_start_token_id", None), getattr(self.processor, "image_end_token_id", None))
        return {int(i) for i in ids if i is not None and int(i) != self.image_token_id}

    def _patch_positions(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(patches,)``: the decoder position of the merged token each raster-order patch feeds."""
        merge = self._merge()
        rows = []
        for layout, (height, width) in zip(px.flat_layouts(self, inputs), self._grids(inputs), strict=True):
            (grid,) = layout.grids
            cells = grid.positions.view(grid.rows, grid.cols)
            rows.append(cells.repeat_interleave(merge, 0).repeat_interleave(merge, 1)[:height, :width].flatten())
        return torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)

    def pixel_cell_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``pixel_values`` are flattened patches ``(patches, C*P*P)`` in raster order over each image."""
        values = px.check_pixels(_tensor(inputs, "pixel_values"), (2,), self.model_type)
        rows = self._patch_positions(inputs)
        if rows.numel() != values.shape[0]:
            raise AdapterError(
                f"{self.model_type}: {values.shape[0]} patch rows but image_grid_thw accounts for {rows.numel()}"
            )
        return px.expand_channels(rows.to(values.device), values.shape, (1,))

    def vision_token_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(1, patches)``: the blocks see every image's patches in one packed sequence."""
        values = px.check_pixels(_tensor(inputs, "pixel_values"), (2,), self.model_type)
        return self._patch_positions(inputs).to(values.device).unsqueeze(0)
