"""Janus (and, through the shared pieces here, DeepSeek-VL): one square vision input per image, its
patches a ``rows x cols`` grid of decoder tokens between ``<begin_of_image>`` and ``<end_of_image>``.
The image processor resizes the longest side to the square's side (the shorter rounded, at least
``min_size``) and pads the other centred with the mean colour, so on a non-square image the grid
also covers padding: its region reaches past the image's edges.

Janus also carries a VQ-VAE, for generating images only; understanding reads SigLIP features, which
is why the generic adapter (which takes a ``vq_config`` for early fusion) does not serve it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import AdapterError
from ..layout import FULL_IMAGE, Region
from . import pixels as px
from .base import GridPlan, ImagePlan, ModelAdapter, _tensor, register_adapter


def _side(size: Any) -> int | None:
    """The square side of an image processor's ``size`` (a dict or a SizeDict), or None."""
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    height, width = get("height"), get("width")
    return int(height) if height and height == width else None


def pad_to_square_region(image_processor: Any, image_size: tuple[int, int], size_attr: str = "size") -> Region | None:
    """Where a resize-longest-then-pad-to-square processor puts the grid over the original image.

    ``(top, left, bottom, right)`` in fractions of the original image, beyond 0 or 1 on the padded
    axis; the full image when the processor neither resizes this way nor pads; None when its
    square side is unknown.
    """
    if image_processor is None or not getattr(image_processor, "do_pad", False):
        return FULL_IMAGE
    side = _side(getattr(image_processor, size_attr, None))
    if side is None:
        return None
    height, width = image_size
    if getattr(image_processor, "do_resize", True):
        scale = side / max(height, width)
        floor = int(getattr(image_processor, "min_size", 0) or 0)
        height, width = max(round(height * scale), floor), max(round(width * scale), floor)
    if height == width:
        return FULL_IMAGE
    square = max(height, width)
    if width > height:
        start = (square - height) // 2
        return (-start / height, 0.0, (square - start) / height, 1.0)
    start = (square - width) // 2
    return (0.0, -start / width, 1.0, (square - start) / width)


class SquareViewAdapter(ModelAdapter):
    """One padded square vision input per image; one patch grid; markers named by the processor."""

    vision_tower_path = "model.vision_model"
    projector_path = "model.aligner"

    def _marker_tokens(self) -> tuple[str | None, ...]:
        return (getattr(self.processor, "image_start_token", None), getattr(self.processor, "image_end_token", None))

    def _marker_ids(self, inputs: Mapping[str, Any], row: int) -> set[int]:
        ids = set()
        unknown = getattr(self.tokenizer, "unk_token_id", None)
        for token in self._marker_tokens():
            if token:
                token_id = self.tokenizer.convert_tokens_to_ids(token)
                if token_id is not None and token_id != unknown:
                    ids.add(int(token_id))
        return ids

    def _grid_shape(self, pixels: torch.Tensor) -> tuple[int, int]:
        patch = self.patch_size
        return pixels.shape[-2] // patch, pixels.shape[-1] // patch

    def _batch_plans(self, inputs: Mapping[str, Any]) -> list[ImagePlan]:
        pixels = _tensor(inputs, "pixel_values")
        if pixels is None:
            return []
        if pixels.dim() != 4:
            raise AdapterError(f"{self.model_type}: pixel_values of shape {tuple(pixels.shape)}; expected (N, C, H, W)")
        rows, cols = self._grid_shape(pixels)
        return [ImagePlan((GridPlan("image", rows, cols),)) for _ in range(pixels.shape[0])]

    def _grid_region(self, grid: GridPlan, image_size: tuple[int, int]) -> Region | None:
        return pad_to_square_region(getattr(self.processor, "image_processor", None), image_size)

    def pixel_cell_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Each ``patch_size`` square of a vision input maps to its patch's cell (padding included)."""
        return px.single_view_map(self, inputs, self.model_type, self.patch_size)


@register_adapter
class JanusAdapter(SquareViewAdapter):
    """Janus: SigLIP patches of the padded square, through the aligner MLP, one token each."""

    model_types = ("janus",)
    family = "Janus"
