"""Qwen2-VL and Qwen2.5-VL: dynamic resolution. ``image_grid_thw`` gives each image's patch grid;
the merger fuses ``spatial_merge_size`` x ``spatial_merge_size`` patches into one decoder token,
row-major over the merged grid, between ``<|vision_start|>`` and ``<|vision_end|>``."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import AdapterError
from . import pixels as px
from .base import GridPlan, ImagePlan, ModelAdapter, _tensor, register_adapter


@register_adapter
class Qwen2VLAdapter(ModelAdapter):
    """Qwen2-VL / Qwen2.5-VL: one merged grid per image (per frame when ``t`` > 1).

    The vision blocks see un-merged patches grouped by merge window (Qwen2.5-VL also permutes
    them into attention windows); only the decoder positions here are row-major.
    """

    model_types = ("qwen2_vl", "qwen2_5_vl")
    family = "Qwen2-VL"

    vision_tower_path = "model.visual"
    projector_path = "model.visual.merger"

    def _batch_plans(self, inputs: Mapping[str, Any]) -> list[ImagePlan]:
        grid_thw = _tensor(inputs, "image_grid_thw")
        if grid_thw is None:
            if _tensor(inputs, "pixel_values") is not None:
                raise AdapterError(f"{self.model_type}: inputs have pixel_values but no image_grid_thw")
            return []
        merge = int(self.config.vision_config.spatial_merge_size)
        plans = []
        for frames, height, width in grid_thw.tolist():
            rows, cols = int(height) // merge, int(width) // merge
            if frames == 1:
                plans.append(ImagePlan((GridPlan("image", rows, cols),)))
            else:
                plans.append(ImagePlan(tuple(GridPlan(f"frame_{t}", rows, cols) for t in range(int(frames)))))
        return plans

    def _marker_ids(self, inputs: Mapping[str, Any], row: int) -> set[int]:
        ids = (getattr(self.config, "vision_start_token_id", None), getattr(self.config, "vision_end_token_id", None))
        return {int(i) for i in ids if i is not None}

    def _patch_positions(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(patches,)``: the position of the merged token each row of ``pixel_values`` feeds.

        Rows come image by image, frame by frame, merge window by merge window (row-major over
        the merged grid); ``spatial_merge_size ** 2`` consecutive rows form one token.
        """
        grid_thw = _tensor(inputs, "image_grid_thw")
        if grid_thw is None:
            raise AdapterError(f"{self.model_type}: inputs have no image_grid_thw")
        unit = int(self.config.vision_config.spatial_merge_size) ** 2
        rows = []
        for layout, (frames, height, width) in zip(px.flat_layouts(self, inputs), grid_thw.tolist(), strict=True):
            tokens = torch.cat([grid.positions for grid in layout.grids])
            if int(frames) * int(height) * int(width) != tokens.numel() * unit:
                raise AdapterError(
                    f"{self.model_type}: a {frames}x{height}x{width} patch grid does not merge into "
                    f"{tokens.numel()} tokens"
                )
            rows.append(tokens.repeat_interleave(unit))
        return torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)

    def pixel_cell_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``pixel_values`` are flattened patches ``(patches, C*T*P*P)``: each row maps to its merged token."""
        values = px.check_pixels(_tensor(inputs, "pixel_values"), (2,), self.model_type)
        rows = self._patch_positions(inputs)
        if rows.numel() != values.shape[0]:
            raise AdapterError(
                f"{self.model_type}: {values.shape[0]} patch rows but image_grid_thw accounts for {rows.numel()}"
            )
        return px.expand_channels(rows.to(values.device), values.shape, (1,))

    def vision_token_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(patches,)`` in the order the vision blocks see them: Qwen2.5-VL's window order."""
        values = px.check_pixels(_tensor(inputs, "pixel_values"), (2,), self.model_type)
        rows = self._patch_positions(inputs)
        visual = self.vision_tower
        if hasattr(visual, "permute_input_for_window_attn"):
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(
                _tensor(inputs, "image_grid_thw").cpu(),
                spatial_merge_size=visual.spatial_merge_size,
                window_size=visual.window_size,
                patch_size=visual.patch_size,
            )
            rows = visual.permute_input_for_window_attn(rows[:, None], window_index, seq_len=rows.numel())[:, 0]
        return rows.to(values.device)
