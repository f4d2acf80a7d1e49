"""Cohere Compass: Qwen3-VL's grids (``image_grid_thw``, merged ``spatial_merge_size`` x
``spatial_merge_size``, deepstack features added at the image positions) which the generic adapter
derives, on a Cohere2 decoder whose head multiplies the logits by the text config's
``logit_scale``: the generic read-out would leave that out, so the logit lens would not match the
model's own logits."""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import register_adapter
from .generic import GenericAdapter


@register_adapter
class CohereCompassAdapter(GenericAdapter):
    """Cohere Compass: the generic grids and modules; Cohere's scaled logits in the read-out."""

    model_types = ("cohere_compass",)
    family = "Cohere Compass"
    kind: ClassVar[str] = "own"

    @staticmethod
    def refusal(config: Any) -> str | None:
        return None

    def _marker_ids(self, inputs, row: int) -> set[int]:
        ids = (getattr(self.config, "vision_start_token_id", None), getattr(self.config, "vision_end_token_id", None))
        return {int(i) for i in ids if i is not None}

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Cohere's head multiplies the logits by the text config's ``logit_scale``, as the forward does."""
        logits = super().unembed(hidden)
        scale = getattr(self.config.get_text_config(), "logit_scale", None)
        return logits * float(scale) if scale is not None else logits
