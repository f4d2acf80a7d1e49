"""LFM3-VL: Qwen2-VL's ``image_grid_thw`` layout (merge-window-ordered patches; the projector fuses
each ``spatial_merge_size`` x ``spatial_merge_size`` window into one decoder token, row-major, between
``<|vision_start|>`` and ``<|vision_end|>``). Its vision tower mixes patches in two ways: attention
blocks and gated depthwise convolutions over each frame's patch grid; its LFM3 decoder likewise has
short-convolution blocks between attention ones, and calls its MLP ``feed_forward`` (``w2`` the
down projection, the activation a function, not a module) and its final norm ``embedding_norm``.

Each vision block's token mixer (its attention or its convolution) is its ``vision.blocks.{i}.attn``
hook point, so that switching "attention" off switches off all mixing between patches, as the cell
check needs; the blocks whose mixer is a convolution give no attention weights, and
:meth:`lacks_for_config` says so from the vision config's layer types."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .base import ModelAdapter, register_adapter
from .qwen2_vl import Qwen2VLAdapter
from .thw import thw_patch_positions

VISION_CONV = "conv"
"""A vision block's convolution mixer: the attribute LFM3-VL's convolution blocks have instead of ``self_attn``."""


@register_adapter
class Lfm3VlAdapter(Qwen2VLAdapter):
    """LFM3-VL: one merged grid per image; convolution and attention mixers in tower and decoder."""

    model_types = ("lfm3_vl",)
    family = "LFM3-VL"

    vision_tower_path = ModelAdapter.vision_tower_path
    projector_path = ModelAdapter.projector_path
    vision_layers_candidates = ("layers",)
    vision_attn_candidates = ("self_attn", VISION_CONV)
    decoder_mlp_attr = "feed_forward"
    decoder_mlp_down_attr = "w2"
    final_norm_attr = "embedding_norm"

    def vision_token_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(patches,)`` in merge-window order: the convolutions raster each frame and go back."""
        rows = thw_patch_positions(self, inputs, self._merge())
        return rows.to(inputs["pixel_values"].device)

    @classmethod
    def lacks_for_config(cls, config: Any, capability: str) -> str | None:
        """The vision blocks whose config layer type is not attention are convolutions."""
        if capability == "vision_attention":
            kinds = [str(k) for k in getattr(getattr(config, "vision_config", None), "layer_types", None) or []]
            convs = [k for k in kinds if "attention" not in k]
            if convs:
                return (f"{len(convs)} of its {len(kinds)} vision blocks mix patches by a gated depthwise "
                        "convolution, not attention, so attention paths through the vision tower are incomplete")
        return super().lacks_for_config(config, capability)
