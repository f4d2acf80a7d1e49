"""Gemma 3: SigLIP patches average-pooled to ``mm_tokens_per_image`` soft tokens per image,
framed by ``<start_of_image>`` and ``<end_of_image>``."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import AdapterError
from . import pixels as px
from .base import GridPlan, ImagePlan, ModelAdapter, _tensor, register_adapter


@register_adapter
class Gemma3Adapter(ModelAdapter):
    """Gemma 3: one pooled ``image`` grid per vision input.

    With pan-and-scan on, every crop is a vision input of its own and gets its own layout,
    whose region is unknown (None): the processor does not report the crop boxes.
    """

    model_types = ("gemma3",)
    family = "Gemma 3"

    def _batch_plans(self, inputs: Mapping[str, Any]) -> list[ImagePlan]:
        pixels = _tensor(inputs, "pixel_values")
        if pixels is None:
            return []
        tokens = int(self.config.mm_tokens_per_image)
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise AdapterError(f"gemma3: mm_tokens_per_image={tokens} is not a square grid")
        image_processor = getattr(self.processor, "image_processor", None)
        cropping = bool(getattr(image_processor, "do_pan_and_scan", False))
        region = None if cropping else GridPlan("image", side, side).region
        return [ImagePlan((GridPlan("image", side, side, region),)) for _ in range(pixels.shape[0])]

    def _marker_ids(self, inputs: Mapping[str, Any], row: int) -> set[int]:
        ids = (getattr(self.config, "boi_token_id", None), getattr(self.config, "eoi_token_id", None))
        return {int(i) for i in ids if i is not None}

    def pooling_kernel(self) -> int:
        """Patches per side of the block the projector averages into one soft token."""
        vision = self.config.vision_config
        patches_per_side = int(vision.image_size) // int(vision.patch_size)
        tokens_per_side = math.isqrt(int(self.config.mm_tokens_per_image))
        if tokens_per_side == 0 or patches_per_side % tokens_per_side:
            raise AdapterError(
                f"gemma3: {patches_per_side} patches per side do not pool evenly to {tokens_per_side} tokens"
            )
        return patches_per_side // tokens_per_side

    def pixel_cell_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Each pooled token covers a ``kernel x kernel`` block of patches of its vision input."""
        return px.single_view_map(self, inputs, self.model_type, self.patch_size * self.pooling_kernel())
