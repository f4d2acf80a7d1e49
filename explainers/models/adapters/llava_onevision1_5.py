"""LLaVA-OneVision-1.5: Qwen2-VL's ``image_grid_thw`` layout (merge-window-ordered patches, merged
``spatial_merge_size`` x ``spatial_merge_size`` into row-major decoder tokens between
``<|vision_start|>`` and ``<|vision_end|>``), but its RICE-ViT tower puts class tokens before each
frame's patches, which the vision blocks see and the merger drops. The generic adapter derives the
grids; its vision-token map would not have the class tokens, so it would not match the blocks."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import AdapterError
from . import pixels as px
from .base import _tensor, register_adapter
from .qwen2_vl import Qwen2VLAdapter


@register_adapter
class LlavaOnevision15Adapter(Qwen2VLAdapter):
    """LLaVA-OneVision-1.5: Qwen2-VL's grids; class tokens (-1) before each frame in the vision map."""

    model_types = ("llava_onevision1_5",)
    family = "LLaVA-OneVision-1.5"

    def vision_extra_tokens(self) -> int:
        """Class tokens the tower puts before each frame's patches: its class embedding's rows."""
        embeddings = getattr(self.vision_tower, "cls_embeddings", None)
        cls = getattr(embeddings, "class_embedding", None)
        if not isinstance(cls, torch.Tensor):
            return 0
        return 1 if cls.dim() == 1 else int(cls.shape[0])

    def vision_token_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(class tokens + patches,)`` per frame, in the order the vision blocks see them."""
        rows = super().vision_token_map(inputs)
        grid_thw = _tensor(inputs, "image_grid_thw")
        lengths = [int(h) * int(w) for t, h, w in grid_thw.tolist() for _ in range(int(t))]
        if sum(lengths) != rows.numel():
            raise AdapterError(f"{self.model_type}: {rows.numel()} patches but image_grid_thw accounts for {sum(lengths)}")
        lead = self.vision_extra_tokens()
        frames = [px.with_leading_tokens(frame[None], lead)[0] for frame in rows.split(lengths)]
        return torch.cat(frames) if frames else rows
