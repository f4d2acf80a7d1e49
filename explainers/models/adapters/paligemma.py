"""PaliGemma: every SigLIP patch of the resized image becomes one prefix token; the prefix
(image + prompt) is attended bidirectionally, the suffix (the answer) causally."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from . import pixels as px
from .base import GridPlan, ImagePlan, ModelAdapter, _tensor, register_adapter


@register_adapter
class PaliGemmaAdapter(ModelAdapter):
    """PaliGemma: one ``image`` grid of SigLIP patches per image."""

    model_types = ("paligemma",)
    family = "PaliGemma"

    # token_type_ids 1 marks the causal suffix, as generation does for new tokens.
    per_token_fill: ClassVar[dict[str, int]] = {**ModelAdapter.per_token_fill, "token_type_ids": 1}
    # PaliGemma 2 (Gemma 2 decoder) caps its logits; the forward reads the cap from the text config.
    final_logit_softcap_attr: ClassVar[str | None] = "final_logit_softcapping"

    def _batch_plans(self, inputs: Mapping[str, Any]) -> list[ImagePlan]:
        pixels = _tensor(inputs, "pixel_values")
        if pixels is None:
            return []
        patch = int(self.config.vision_config.patch_size)
        rows, cols = pixels.shape[-2] // patch, pixels.shape[-1] // patch
        return [ImagePlan((GridPlan("image", rows, cols),)) for _ in range(pixels.shape[0])]

    def pixel_cell_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Each SigLIP patch of a vision input maps to its own grid cell."""
        return px.single_view_map(self, inputs, self.model_type, self.patch_size)
