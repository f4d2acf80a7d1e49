"""PaddleOCR-VL: ``image_grid_thw`` as in Qwen2-VL, but ``pixel_values`` holds each image's patches
row-major over its whole patch grid, ``(patches, C, P, P)``, and the vision blocks see them in that
order; the projector itself gathers each ``merge x merge`` window into one decoder token (row-major
over the merged grid), between ``<|IMAGE_START|>`` and ``<|IMAGE_END|>``."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import AdapterError
from . import pixels as px
from .base import _tensor, register_adapter
from .qwen2_vl import Qwen2VLAdapter


@register_adapter
class PaddleOCRVLAdapter(Qwen2VLAdapter):
    """PaddleOCR-VL: one merged grid per image; patch rows in raster order, not merge-window order."""

    model_types = ("paddleocr_vl",)
    family = "PaddleOCR-VL"

    vision_tower_path = "model.visual"
    projector_path = "model.projector"

    def _patch_positions(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(patches,)``: the decoder position of the merged token each raster-order patch feeds."""
        grid_thw = _tensor(inputs, "image_grid_thw")
        if grid_thw is None:
            raise AdapterError(f"{self.model_type}: inputs have no image_grid_thw")
        merge = self._merge()
        rows = []
        for layout, (frames, height, width) in zip(px.flat_layouts(self, inputs), grid_thw.tolist(), strict=True):
            tokens = torch.cat([grid.positions for grid in layout.grids])
            frames, height, width = int(frames), int(height), int(width)
            if height % merge or width % merge or tokens.numel() != frames * (height // merge) * (width // merge):
                raise AdapterError(
                    f"{self.model_type}: a {frames}x{height}x{width} patch grid does not merge into {tokens.numel()} tokens"
                )
            t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
            cols = width // merge
            index = t * (height // merge) * cols + (y // merge) * cols + x // merge
            rows.append(tokens[index.flatten()])
        return torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)

    def pixel_cell_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Each patch of ``pixel_values`` (first axis, raster order per image) maps to its merged token."""
        values = px.check_pixels(_tensor(inputs, "pixel_values"), (2, 4), self.model_type)
        rows = self._patch_positions(inputs)
        if rows.numel() != values.shape[0]:
            raise AdapterError(
                f"{self.model_type}: {values.shape[0]} patches but image_grid_thw accounts for {rows.numel()}"
            )
        return px.expand_channels(rows.to(values.device), values.shape, tuple(range(1, values.dim())))

    def vision_token_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(patches,)``: the vision blocks see the patches in ``pixel_values`` order."""
        values = px.check_pixels(_tensor(inputs, "pixel_values"), (2, 4), self.model_type)
        return self._patch_positions(inputs).to(values.device)
