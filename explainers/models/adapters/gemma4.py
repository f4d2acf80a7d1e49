"""Gemma 4: each image is resized (aspect ratio kept) to a multiple of ``pooling_kernel_size x
patch_size`` pixels a side and sent as its patches, row-major, padded to a fixed count:
``pixel_values`` is ``(images, max_patches, P*P*C)`` and ``image_position_ids`` gives each patch's
(x, y), (-1, -1) for padding. The vision tower pools each ``k x k`` block of patches into one soft
token, row-major over the pooled grid, between ``<start_of_image>`` and ``<end_of_image>``; the
multimodal forward caps the logits with ``final_logit_softcapping``. The generic adapter reads no
patch positions, so it cannot lay this out."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..errors import AdapterError
from . import pixels as px
from .base import GridPlan, ImagePlan, ModelAdapter, _tensor, register_adapter


@register_adapter
class Gemma4Adapter(ModelAdapter):
    """Gemma 4: one pooled grid per image, its size read from the patches' positions."""

    model_types = ("gemma4",)
    family = "Gemma 4"

    vision_tower_path = "model.vision_tower"
    projector_path = "model.embed_vision"
    final_logit_softcap_attr: ClassVar[str | None] = "final_logit_softcapping"

    @property
    def kernel(self) -> int:
        """Patches a side the tower pools into one soft token."""
        return int(self.config.vision_config.pooling_kernel_size)

    def _positions(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        positions = _tensor(inputs, "image_position_ids")
        if positions is None:
            raise AdapterError(f"{self.model_type}: inputs have pixel_values but no image_position_ids")
        return positions.detach().cpu().long()

    def _grids(self, inputs: Mapping[str, Any]) -> list[tuple[int, int]]:
        """``(rows, cols)`` of each image's pooled grid, from its patches' largest (x, y)."""
        grids = []
        for patches in self._positions(inputs):
            real = patches[(patches >= 0).all(dim=-1)]
            if real.numel() == 0:
                raise AdapterError(f"{self.model_type}: an image with no patches")
            width, height = int(real[:, 0].max()) + 1, int(real[:, 1].max()) + 1
            if width % self.kernel or height % self.kernel:
                raise AdapterError(f"{self.model_type}: a {height}x{width} patch grid does not pool by {self.kernel}")
            grids.append((height // self.kernel, width // self.kernel))
        return grids

    def _batch_plans(self, inputs: Mapping[str, Any]) -> list[ImagePlan]:
        if _tensor(inputs, "pixel_values") is None:
            return []
        return [ImagePlan((GridPlan("image", rows, cols),)) for rows, cols in self._grids(inputs)]

    def _marker_ids(self, inputs: Mapping[str, Any], row: int) -> set[int]:
        ids = (getattr(self.config, "boi_token_id", None), getattr(self.config, "eoi_token_id", None))
        return {int(i) for i in ids if i is not None}

    def _patch_positions(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(images, max_patches)``: the decoder position each patch is pooled into (-1: padding)."""
        positions = self._positions(inputs)
        layouts = px.flat_layouts(self, inputs)
        if len(layouts) != positions.shape[0]:
            raise AdapterError(f"{self.model_type}: {positions.shape[0]} images of patches but {len(layouts)} layouts")
        out = torch.full(positions.shape[:2], px.NO_CELL, dtype=torch.long)
        for image, (layout, patches) in enumerate(zip(layouts, positions, strict=True)):
            (grid,) = layout.grids
            real = (patches >= 0).all(dim=-1)
            cell = (patches[real, 1] // self.kernel) * grid.cols + patches[real, 0] // self.kernel
            out[image, real] = grid.positions[cell]
        return out

    def pixel_cell_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Each patch row of ``pixel_values`` maps to the soft token its block pools into."""
        values = px.check_pixels(_tensor(inputs, "pixel_values"), (3,), self.model_type)
        return px.expand_channels(self._patch_positions(inputs).to(values.device), values.shape, (2,))

    def vision_token_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(images, max_patches)``: the vision blocks see the padded patch rows as they are sent."""
        values = px.check_pixels(_tensor(inputs, "pixel_values"), (3,), self.model_type)
        return self._patch_positions(inputs).to(values.device)
