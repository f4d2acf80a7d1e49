"""Qwen2-VL and Qwen2.5-VL: dynamic resolution. ``image_grid_thw`` gives each image's patch grid;
the merger fuses ``spatial_merge_size`` x ``spatial_merge_size`` patches into one decoder token,
row-major over the merged grid, between ``<|vision_start|>`` and ``<|vision_end|>``."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import AdapterError
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
