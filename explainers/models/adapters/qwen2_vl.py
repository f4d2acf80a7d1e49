"""Qwen2-VL and Qwen2.5-VL: dynamic resolution. ``image_grid_thw`` gives each image's patch grid;
the merger fuses ``spatial_merge_size`` x ``spatial_merge_size`` patches into one decoder token,
row-major over the merged grid, between ``<|vision_start|>`` and ``<|vision_end|>``."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from . import pixels as px
from .base import ImagePlan, ModelAdapter, _tensor, register_adapter
from .thw import thw_patch_positions, thw_pixel_cell_map, thw_plans


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

    def _merge(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def _batch_plans(self, inputs: Mapping[str, Any]) -> list[ImagePlan]:
        return thw_plans(self, inputs, self._merge())

    def _marker_ids(self, inputs: Mapping[str, Any], row: int) -> set[int]:
        ids = (getattr(self.config, "vision_start_token_id", None), getattr(self.config, "vision_end_token_id", None))
        return {int(i) for i in ids if i is not None}

    def pixel_cell_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``pixel_values`` are flattened patches ``(patches, C*T*P*P)``: each row maps to its merged token."""
        return thw_pixel_cell_map(self, inputs, self._merge())

    def vision_token_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(patches,)`` in the order the vision blocks see them: Qwen2.5-VL's window order."""
        values = px.check_pixels(_tensor(inputs, "pixel_values"), (2,), self.model_type)
        rows = thw_patch_positions(self, inputs, self._merge())
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
