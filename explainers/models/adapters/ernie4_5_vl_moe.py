"""ERNIE-4.5-VL (MoE): Qwen2-VL's ``image_grid_thw`` layout (merge-window-ordered patches; the
resampler fuses each ``spatial_merge_size`` x ``spatial_merge_size`` window into one decoder token,
row-major), between ``<|IMAGE_START|>`` and ``<|IMAGE_END|>``. The decoder routes each token to text
or vision experts by ``moe_mm_token_type_ids``, a per-token input the generic adapter does not extend
when answer tokens are appended (answer tokens are text: 0); the projector is ``model.resampler_model``."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from .base import ModelAdapter, register_adapter
from .qwen2_vl import Qwen2VLAdapter


@register_adapter
class Ernie45VLMoeAdapter(Qwen2VLAdapter):
    """ERNIE-4.5-VL: Qwen2-VL's grids; the MoE routing ids follow appended answer tokens."""

    model_types = ("ernie4_5_vl_moe",)
    family = "ERNIE-4.5-VL"

    vision_tower_path = "model.vision_tower"
    projector_path = "model.resampler_model"
    per_token_fill: ClassVar[dict[str, int]] = {**ModelAdapter.per_token_fill, "moe_mm_token_type_ids": 0}

    def _marker_ids(self, inputs: Mapping[str, Any], row: int) -> set[int]:
        ids = (getattr(self.config, "image_start_token_id", None), getattr(self.config, "image_end_token_id", None))
        return {int(i) for i in ids if i is not None}
