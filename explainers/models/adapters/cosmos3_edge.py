"""Cosmos3 Edge: Qwen2-VL's layout (``image_grid_thw``, ``spatial_merge_size`` x
``spatial_merge_size`` patches a token, row-major, between ``<|vision_start|>`` and
``<|vision_end|>``) on a SigLIP2-style tower at ``model.visual`` with its merger at
``model.projector``; the decoder's MLPs are non-gated (``fc1``, ``activation_fn``, ``fc2``).

Its forward computes multimodal RoPE from ``mm_token_type_ids``, which the processor returns only
when asked (its default is not to): inputs built here always carry them, from the processor's own
``create_mm_token_type_ids``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import IMAGE_SIZES_ATTR, register_adapter
from .qwen2_vl import Qwen2VLAdapter


@register_adapter
class Cosmos3EdgeAdapter(Qwen2VLAdapter):
    """Cosmos3 Edge: Qwen2-VL's grids; its own module paths, MLP names and modality ids."""

    model_types = ("cosmos3_edge",)
    family = "Cosmos3 Edge"

    vision_tower_path = "model.visual"
    projector_path = "model.projector"
    decoder_mlp_act_attr = "activation_fn"
    decoder_mlp_down_attr = "fc2"

    def build_inputs(
        self, images: Sequence[Any], question: str, answer: str | None = None
    ) -> tuple[Any, torch.Tensor]:
        inputs, positions = super().build_inputs(images, question, answer)
        if "mm_token_type_ids" not in inputs and hasattr(self.processor, "create_mm_token_type_ids"):
            sizes = getattr(inputs, IMAGE_SIZES_ATTR, None)
            ids = inputs["input_ids"]
            types = self.processor.create_mm_token_type_ids(ids.detach().cpu())
            inputs["mm_token_type_ids"] = torch.as_tensor(types, dtype=torch.long, device=ids.device)
            if sizes is not None:
                object.__setattr__(inputs, IMAGE_SIZES_ATTR, sizes)
        return inputs, positions
