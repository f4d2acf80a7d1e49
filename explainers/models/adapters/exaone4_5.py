"""EXAONE 4.5: Qwen2.5-VL's vision tower (patches permuted into attention windows, merged
``spatial_merge_size`` x ``spatial_merge_size`` and put back in order by the merger) on Qwen2-VL's
``image_grid_thw`` inputs. The generic adapter derives its grids, but not the window order the
vision blocks see, so its vision-token map would pool block activations onto the wrong cells."""
from __future__ import annotations

from .base import register_adapter
from .qwen2_vl import Qwen2VLAdapter


@register_adapter
class Exaone45Adapter(Qwen2VLAdapter):
    """EXAONE 4.5: Qwen2-VL's layout, and the window order read from the tower as for Qwen2.5-VL."""

    model_types = ("exaone4_5",)
    family = "EXAONE 4.5"
