"""Chameleon: early fusion through discrete image tokens.

The processor resizes the shortest side and crops the centre to the VQ-VAE's square, and writes
``image_seq_length`` ``<image>`` placeholders between a begin (``<racm3:break>``) and an end
(``<eoss>``) token. The model encodes the pixels with the VQ-VAE's convolutional encoder, takes the
nearest codebook vector of every cell of its output (one code per ``2**downsamplings`` pixels a
side, row-major), renames each code to its vocabulary token and embeds that like text, over the
placeholders. So every image is one ``rows x cols`` grid of decoder tokens, and every decoder-side
explainer (attention, relevancy, logit lens, knockout, patching, token dropping, neurons) runs as on
any family.

What does not apply: the code is an ``argmin``, so no gradient reaches the pixels or the encoder
(the gradient explainers and Grad-CAM), and the encoder's 3x3 convolutions and middle attention
block let pixels outside a cell decide its code, so no cell owns its pixels (occlusion and the
causal set mask cells through such a map). Those explainers refuse, with these reasons.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import AdapterError
from ..layout import Region
from .base import GridPlan, ImagePlan, ModelAdapter, _tensor, register_adapter
from .llava import center_crop_region

VQ_NO_GRADIENT = (
    "early fusion: the image becomes discrete VQ codes (a nearest-codebook lookup), so no gradient reaches "
    "the pixels or the VQ encoder's blocks"
)


@register_adapter
class ChameleonAdapter(ModelAdapter):
    """Chameleon: one grid of VQ-code tokens per image, embedded by the decoder's own embeddings."""

    model_types = ("chameleon",)
    family = "Chameleon"

    vision_tower_path = "model.vqmodel"
    # The codes' last learned step before the lookup: the decoder reads their token embeddings.
    projector_path = "model.vqmodel.quant_conv"
    language_model_path = "model"

    lacks_pixel_cells: ClassVar[str | None] = (
        "early fusion: each image token is a VQ code, the nearest codebook entry to convolutional features of "
        "neighbouring cells, so no cell's pixels alone decide its token and no gradient reaches the pixels"
    )
    lacks_vision_attention: ClassVar[str | None] = VQ_NO_GRADIENT
    lacks_vision_blocks: ClassVar[str | None] = VQ_NO_GRADIENT

    @property
    def image_token_id(self) -> int:
        """The placeholder the model overwrites: its vocabulary map's ``<image>`` (the config's field
        is optional), else the config's or the processor's."""
        mapping = getattr(getattr(self.model, "model", None), "vocabulary_mapping", None)
        token = getattr(mapping, "image_token_id", None)
        return int(token) if token is not None else super().image_token_id

    def vision_layers(self) -> nn.ModuleList:
        """None to read: no gradient or attention path leads from the decoder into the VQ encoder."""
        return nn.ModuleList()

    @property
    def downsampling(self) -> int:
        """Pixels per code along a side: the encoder halves the resolution once per level after the first."""
        levels = len(self.config.vq_config.channel_multiplier)
        return 2 ** (levels - 1)

    def _batch_plans(self, inputs: Mapping[str, Any]) -> list[ImagePlan]:
        pixels = _tensor(inputs, "pixel_values")
        if pixels is None:
            return []
        if pixels.dim() != 4:
            raise AdapterError(f"{self.model_type}: pixel_values of shape {tuple(pixels.shape)}; expected (images, C, H, W)")
        factor = self.downsampling
        height, width = int(pixels.shape[-2]), int(pixels.shape[-1])
        if height % factor or width % factor:
            raise AdapterError(
                f"{self.model_type}: a {height}x{width} image is not a whole number of {factor}-pixel VQ cells"
            )
        rows, cols = height // factor, width // factor
        total = int((self._input_ids(inputs) == self.image_token_id).sum())
        if total != pixels.shape[0] * rows * cols:
            raise AdapterError(
                f"{self.model_type}: {total} image tokens for {pixels.shape[0]} image(s) of {rows}x{cols} VQ codes"
            )
        region = center_crop_region(getattr(self.processor, "image_processor", None), None)
        return [ImagePlan((GridPlan("image", rows, cols, region),)) for _ in range(pixels.shape[0])]

    def _grid_region(self, grid: GridPlan, image_size: tuple[int, int]) -> Region | None:
        return center_crop_region(getattr(self.processor, "image_processor", None), image_size)

    def _marker_ids(self, inputs: Mapping[str, Any], row: int) -> set[int]:
        """The begin and end tokens around each image's codes."""
        ids = (getattr(self.processor, "image_start_token_id", None), getattr(self.processor, "image_end_token_id", None))
        return {int(i) for i in ids if i is not None}

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """As the model's forward reads its logits: image-code tokens are never a text answer (their
        logits are set to the dtype's minimum)."""
        logits = super().unembed(hidden)
        codes = self.model.model.vocabulary_mapping.image_tokens
        logits[..., codes] = torch.finfo(logits.dtype).min
        return logits
