"""LLaVA-1.5: one fixed-size vision input per image, its patch grid written into the sequence."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import AdapterError
from ..layout import FULL_IMAGE, Region
from . import pixels as px
from .base import ExtraPlan, GridPlan, ImagePlan, ModelAdapter, _tensor, register_adapter


def _size_value(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
    return int(value) if value else None


def center_crop_region(image_processor: Any, image_size: tuple[int, int] | None) -> Region | None:
    """The part of the original image that survives a resize-then-center-crop processor.

    CLIP-style processors resize the shortest edge and crop the centre: on a non-square image
    the patch grid covers only the middle. None when that depends on an image size not given.
    """
    if image_processor is None or not getattr(image_processor, "do_center_crop", False):
        return FULL_IMAGE
    crop = getattr(image_processor, "crop_size", None)
    crop_h, crop_w = _size_value(crop, "height"), _size_value(crop, "width")
    if not (crop_h and crop_w):
        return FULL_IMAGE
    size = getattr(image_processor, "size", None) if getattr(image_processor, "do_resize", True) else None
    fixed_h, fixed_w = _size_value(size, "height"), _size_value(size, "width")
    shortest = _size_value(size, "shortest_edge")
    if fixed_h and fixed_w:
        resized_h, resized_w = float(fixed_h), float(fixed_w)
    elif image_size is None:
        return None
    else:
        height, width = image_size
        scale = shortest / min(height, width) if shortest else 1.0
        resized_h, resized_w = height * scale, width * scale
    top = max(0.0, (resized_h - crop_h) / 2 / resized_h)
    left = max(0.0, (resized_w - crop_w) / 2 / resized_w)
    return (top, left, 1.0 - top, 1.0 - left)


@register_adapter
class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5: CLIP patches (minus the class token under the default strategy) per image."""

    model_types = ("llava",)
    family = "LLaVA-1.5"

    def _batch_plans(self, inputs: Mapping[str, Any]) -> list[ImagePlan]:
        pixels = _tensor(inputs, "pixel_values")
        if pixels is None:
            return []
        patch = int(self.config.vision_config.patch_size)
        num_images, height, width = pixels.shape[0], pixels.shape[-2], pixels.shape[-1]
        rows, cols = height // patch, width // patch
        total = int((self._input_ids(inputs) == self.image_token_id).sum())
        per_image, remainder = divmod(total, num_images)
        extra = per_image - rows * cols
        if remainder or extra not in (0, 1):
            raise AdapterError(
                f"llava: {total} image tokens for {num_images} image(s) of {rows}x{cols} patches"
            )
        region = center_crop_region(getattr(self.processor, "image_processor", None), None)
        parts: tuple[GridPlan | ExtraPlan, ...] = (GridPlan("image", rows, cols, region),)
        if extra:  # the "full" feature strategy keeps the vision tower's class token first
            parts = (ExtraPlan("class_token", 1), *parts)
        return [ImagePlan(parts) for _ in range(num_images)]

    def _grid_region(self, grid: GridPlan, image_size: tuple[int, int]) -> Region | None:
        return center_crop_region(getattr(self.processor, "image_processor", None), image_size)

    def pixel_cell_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Each ``patch_size`` square of a vision input maps to its patch's grid cell."""
        return px.single_view_map(self, inputs, self.model_type, self.patch_size)


@register_adapter
class VipLlavaAdapter(LlavaAdapter):
    """VipLlava: LLaVA-1.5's processor and grid; the projector reads several CLIP layers (class
    token dropped from each), so the patch grid is laid out and centre-cropped as LLaVA-1.5's."""

    model_types = ("vipllava",)
    family = "VipLlava"


LEGACY_PIXEL_KEYS = ("pixel_values_images",)
"""Video-LLaVA's image processor still names its output so by default; the model takes it as
``pixel_values`` (the old name is deprecated), the key every adapter and explainer reads."""


@register_adapter
class VideoLlavaAdapter(LlavaAdapter):
    """Video-LLaVA: LLaVA-1.5's layout, its images through an ``image_tower`` of their own."""

    model_types = ("video_llava",)
    family = "Video-LLaVA"
    vision_tower_path = "model.image_tower"

    def build_inputs(self, images: Any, question: str, answer: str | None = None) -> tuple[Any, torch.Tensor]:
        inputs, positions = super().build_inputs(images, question, answer)
        for key in LEGACY_PIXEL_KEYS:
            if key in inputs:
                inputs["pixel_values"] = inputs.pop(key)
        return inputs, positions
