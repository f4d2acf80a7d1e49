"""dots3-note: Qwen2-VL's ``image_grid_thw`` layout (merge-window-ordered patches; the tower's merger
fuses each ``spatial_merge_size`` x ``spatial_merge_size`` window into one decoder token, row-major),
the tower at ``model.vision_tower``. Its top-level model has no ``get_image_features`` (only its base
model does), so the generic adapter cannot check its count against the model's."""
from __future__ import annotations

from .base import register_adapter
from .qwen2_vl import Qwen2VLAdapter


@register_adapter
class Dots3NoteAdapter(Qwen2VLAdapter):
    """dots3-note: Qwen2-VL's grids; the tower and its merger at model.vision_tower."""

    model_types = ("dots3_note",)
    family = "dots3-note"

    vision_tower_path = "model.vision_tower"
    projector_path = "model.vision_tower.merger"
