"""Pixtral's vision tower (Mistral 3, LightOnOCR): every image at its own resolution.

``pixel_values`` pads the batch's images to one size and ``image_sizes`` gives each one's real
(height, width); the tower keeps each image's own ``height // patch x width // patch`` patches
and runs them all as one sequence (a block mask keeps images apart). A learned merger fuses
``spatial_merge_size`` x ``spatial_merge_size`` patches into one decoder token, row-major. Mistral 3's
processor ends every row of image tokens with ``[IMG_BREAK]`` and the image with ``[IMG_END]``:
marker tokens, not features. LightOnOCR's writes the image tokens alone.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import AdapterError
from . import pixels as px
from .base import GridPlan, ImagePlan, ModelAdapter, _tensor, register_adapter


@register_adapter
class PixtralAdapter(ModelAdapter):
    """Mistral 3: one grid ``image`` of merged patches per image, sized from ``image_sizes``."""

    model_types = ("mistral3",)
    family = "Mistral 3 (Pixtral)"

    vision_layers_candidates = ("transformer.layers",)
    vision_attn_candidates = ("attention",)
    marker_attrs = ("image_break_token_id", "image_end_token_id")
    """Processor attributes naming the tokens that frame an image's rows."""

    @property
    def merge(self) -> int:
        """Patches per side fused into one decoder token."""
        return int(getattr(self.config, "spatial_merge_size", 1) or 1)

    def _image_sizes(self, inputs: Mapping[str, Any]) -> list[tuple[int, int]]:
        sizes = _tensor(inputs, "image_sizes")
        if sizes is None:
            if _tensor(inputs, "pixel_values") is not None:
                raise AdapterError(f"{self.model_type}: inputs have pixel_values but no image_sizes")
            return []
        return [(int(h), int(w)) for h, w in sizes.view(-1, 2).tolist()]

    def _batch_plans(self, inputs: Mapping[str, Any]) -> list[ImagePlan]:
        cell = self.patch_size * self.merge
        return [ImagePlan((GridPlan("image", h // cell, w // cell),)) for h, w in self._image_sizes(inputs)]

    def _marker_ids(self, inputs: Mapping[str, Any], row: int) -> set[int]:
        ids = (getattr(self.processor, name, None) for name in self.marker_attrs)
        return {int(i) for i in ids if isinstance(i, int) and i != self.image_token_id}

    def _per_image_maps(self, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``pixel_values`` and, per image, its ``(H, W)`` map over the padded pixels."""
        values = px.check_pixels(_tensor(inputs, "pixel_values"), (4,), self.model_type)
        layouts = px.flat_layouts(self, inputs)
        if len(layouts) != values.shape[0]:
            raise AdapterError(f"{self.model_type}: {values.shape[0]} images in pixel_values, {len(layouts)} layouts")
        cell = self.patch_size * self.merge
        height, width = values.shape[-2:]
        maps = [px.block_map(height, width, px.grid_cells(layout.grids[0]), cell, cell) for layout in layouts]
        return values, maps

    def pixel_cell_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Each ``patch x merge`` square of an image's real area maps to its merged token; the
        padding beyond ``image_sizes`` (and any remainder the patches leave) to -1."""
        values, maps = self._per_image_maps(inputs)
        return px.expand_channels(torch.stack(maps).to(values.device), values.shape, (1,))

    def vision_token_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(1, patches)``: the tower's one sequence, each image's own patches row-major, in order."""
        values, maps = self._per_image_maps(inputs)
        patch = self.patch_size
        rows = []
        for cells, (h, w) in zip(maps, self._image_sizes(inputs), strict=True):
            kept = cells[: (h // patch) * patch, : (w // patch) * patch]
            rows.append(px.patch_map(kept.unsqueeze(0), patch)[0])
        return torch.cat(rows).unsqueeze(0).to(values.device)


@register_adapter
class LightOnOcrAdapter(PixtralAdapter):
    """LightOnOCR: Pixtral's layout, with its own module names and no row markers in the text."""

    model_types = ("lighton_ocr",)
    family = "LightOnOCR"

    vision_tower_path = "model.vision_encoder"
    projector_path = "model.vision_projection"
