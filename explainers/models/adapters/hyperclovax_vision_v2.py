"""HyperCLOVA X SEED Vision v2: Qwen2.5-VL's vision tower (at ``model.vision_model``; patches
permuted into attention windows, merged ``spatial_merge_size`` x ``spatial_merge_size`` and put back
in order) on Qwen2-VL's ``image_grid_thw`` inputs, a linear projector (``model.projector``), and a
HyperCLOVA X decoder whose muP forward multiplies the LM head's logits by ``logits_scaling``.

The generic adapter derives its grids, but neither the window order the vision blocks see (its
vision-token map would pool block activations onto the wrong cells) nor the logit scale (its
logit lens would read logits the model never gives)."""
from __future__ import annotations

import torch

from .base import register_adapter
from .qwen2_vl import Qwen2VLAdapter


@register_adapter
class HyperCLOVAXVisionV2Adapter(Qwen2VLAdapter):
    """Qwen2-VL's layout with Qwen2.5-VL's window order, and the decoder's logit scale."""

    model_types = ("hyperclovax_vision_v2",)
    family = "HyperCLOVA X Vision v2"

    vision_tower_path = "model.vision_model"
    projector_path = "model.projector"

    def logits_scale(self) -> float:
        """The factor the model's forward multiplies its LM head's output by (muP's logits_scaling)."""
        return float(getattr(self.config.get_text_config(), "logits_scaling", 1.0) or 1.0)

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, LM head, then the logit scale, as the model's forward applies them."""
        return super().unembed(hidden) * self.logits_scale()
