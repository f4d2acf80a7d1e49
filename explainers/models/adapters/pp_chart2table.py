"""PP-Chart2Table: GOT-OCR 2's model class under its own config, on a processor that resizes each
image to one encoder input and expands no placeholder (the checkpoint's chat template writes the
image's tokens). One view per image, so the generic adapter's plan (one grid, merge from the count
of features) holds; what it cannot know is GOT-OCR 2's: the SAM-style blocks keep each view's patch
grid ``(views, rows, cols, hidden)``, and the neck's and projector's convolutions reach past their
strides, so a cell's pixels also reach its neighbours' tokens (it lacks ``pixel_cells``)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from .base import register_adapter
from .generic import GenericAdapter
from .internvl import GotOcr2Adapter, crop_patch_map


@register_adapter
class PPChart2TableAdapter(GenericAdapter):
    """PP-Chart2Table: the generic single-view plan, GOT-OCR 2's tower layout and convolution field."""

    model_types = ("pp_chart2table",)
    family = "PP-Chart2Table"
    kind: ClassVar[str] = "own"

    vision_layers_candidates = ("layers",)
    vision_attn_candidates = ("attn",)

    @staticmethod
    def refusal(config: Any) -> str | None:
        return None

    @classmethod
    def lacks_for_config(cls, config: Any, capability: str) -> str | None:
        if capability == "pixel_cells":
            return GotOcr2Adapter.lacks_for_config(config, capability)
        return super().lacks_for_config(config, capability)

    def vision_token_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(views, rows, cols)``: the encoder's blocks keep each view's patch grid."""
        return crop_patch_map(self, inputs)
