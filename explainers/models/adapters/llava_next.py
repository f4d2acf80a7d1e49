"""LLaVA-NeXT (any-res): a base view of the whole image, then its high-resolution tiles stitched
into one grid, unpadded, with an ``image_newline`` feature closing every row of that grid."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import AdapterError
from .base import GridPlan, ImagePlan, ModelAdapter, _tensor, register_adapter

NEWLINE = "image_newline"
"""Reason given for the learned row-separator features in ``ImageLayout.extra_positions``."""


@register_adapter
class LlavaNextAdapter(ModelAdapter):
    """LLaVA-NeXT: grids ``base`` (one vision input) and ``tiles`` (the unpadded any-res grid)."""

    model_types = ("llava_next",)
    family = "LLaVA-NeXT"

    def _tile_grid(self, image_size: list[int], side: int) -> tuple[int, int]:
        """Rows and columns of the stitched, unpadded tile grid, exactly as the model computes them."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        vision = self.config.vision_config
        tiles_high, tiles_wide = get_anyres_image_grid_shape(
            image_size, self.config.image_grid_pinpoints, vision.image_size
        )
        # unpad_image only reads the shape of its tensor: an empty one costs nothing.
        stitched = torch.empty(0, tiles_high * side, tiles_wide * side)
        unpadded = unpad_image(stitched, image_size)
        return int(unpadded.shape[1]), int(unpadded.shape[2])

    def _batch_plans(self, inputs: Mapping[str, Any]) -> list[ImagePlan]:
        sizes = _tensor(inputs, "image_sizes")
        if sizes is None:
            if _tensor(inputs, "pixel_values") is not None:
                raise AdapterError("llava_next: inputs have pixel_values but no image_sizes")
            return []
        vision = self.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        plans = []
        for size in sizes.tolist():
            rows, cols = self._tile_grid([int(v) for v in size], side)
            plans.append(ImagePlan((GridPlan("base", side, side), GridPlan("tiles", rows, cols, row_suffix=NEWLINE))))
        return plans
