"""LLaVA-NeXT (any-res): a base view of the whole image, then its high-resolution tiles stitched
into one grid, unpadded, with an ``image_newline`` feature closing every row of that grid."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import AdapterError
from . import pixels as px
from .base import GridPlan, ImagePlan, ModelAdapter, _tensor, register_adapter

NEWLINE = "image_newline"
"""Reason given for the learned row-separator features in ``ImageLayout.extra_positions``."""


@register_adapter
class LlavaNextAdapter(ModelAdapter):
    """LLaVA-NeXT: grids ``base`` (one vision input) and ``tiles`` (the unpadded any-res grid)."""

    model_types = ("llava_next",)
    family = "LLaVA-NeXT"

    def _tile_grid(self, image_size: list[int], side: int) -> tuple[int, int]:
        """Rows and columns of the stitched, unpadded tile grid, exactly as the model computes them."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        vision = self.config.vision_config
        tiles_high, tiles_wide = get_anyres_image_grid_shape(
            image_size, self.config.image_grid_pinpoints, vision.image_size
        )
        # unpad_image only reads the shape of its tensor: an empty one costs nothing.
        stitched = torch.empty(0, tiles_high * side, tiles_wide * side)
        unpadded = unpad_image(stitched, image_size)
        return int(unpadded.shape[1]), int(unpadded.shape[2])

    def _batch_plans(self, inputs: Mapping[str, Any]) -> list[ImagePlan]:
        sizes = _tensor(inputs, "image_sizes")
        if sizes is None:
            if _tensor(inputs, "pixel_values") is not None:
                raise AdapterError("llava_next: inputs have pixel_values but no image_sizes")
            return []
        vision = self.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        plans = []
        for size in sizes.tolist():
            rows, cols = self._tile_grid([int(v) for v in size], side)
            plans.append(ImagePlan((GridPlan("base", side, side), GridPlan("tiles", rows, cols, row_suffix=NEWLINE))))
        return plans

    def _crop_maps(self, layout: Any, image_size: list[int], height: int, width: int) -> torch.Tensor:
        """``(1 + tiles, H, W)``: the base view's cells, then each tile's cells of the stitched grid.

        The stitched grid's cell indices go through the model's own ``unpad_image``, so the cells
        it removes (the letterbox padding) get -1 and the kept ones line up with ``tiles``.
        """
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        vision = self.config.vision_config
        side, patch = int(vision.image_size) // self.patch_size, self.patch_size
        tiles_high, tiles_wide = get_anyres_image_grid_shape(
            image_size, self.config.image_grid_pinpoints, vision.image_size
        )
        stitched = torch.arange(tiles_high * side * tiles_wide * side).view(1, tiles_high * side, tiles_wide * side)
        kept = unpad_image(stitched, image_size)[0]
        tiles = layout.grid("tiles")
        if tuple(kept.shape) != (tiles.rows, tiles.cols):
            raise AdapterError(
                f"llava_next: unpadding keeps {tuple(kept.shape)} cells, the layout has {tiles.rows}x{tiles.cols}"
            )
        cell_of = torch.full((stitched.numel(),), px.NO_CELL, dtype=torch.long)
        cell_of[kept.flatten()] = tiles.positions
        cell_of = cell_of.view(tiles_high * side, tiles_wide * side)
        maps = [px.block_map(height, width, px.grid_cells(layout.grid("base")), patch, patch)]
        for tile in range(tiles_high * tiles_wide):
            top, left = (tile // tiles_wide) * side, (tile % tiles_wide) * side
            maps.append(px.block_map(height, width, cell_of[top : top + side, left : left + side], patch, patch))
        return torch.stack(maps)

    def _crops_per_image(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        values = px.check_pixels(_tensor(inputs, "pixel_values"), (4, 5), self.model_type)
        sizes = _tensor(inputs, "image_sizes")
        layouts = px.flat_layouts(self, inputs)
        if sizes is None or len(layouts) != sizes.shape[0]:
            given = 0 if sizes is None else sizes.shape[0]
            raise AdapterError(f"llava_next: {len(layouts)} image layouts but image_sizes for {given}")
        height, width = values.shape[-2:]
        return [
            self._crop_maps(layout, [int(v) for v in size], height, width)
            for layout, size in zip(layouts, sizes.tolist(), strict=True)
        ]

    def pixel_cell_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Crop 0 of each image feeds ``base``; the other crops feed ``tiles`` after unpadding.

        ``(images, crops, C, H, W)`` pixel_values pad every image to the same number of crops:
        the padding crops, which the model drops, get -1. Stacked 4-D crops are mapped in order.
        """
        values = px.check_pixels(_tensor(inputs, "pixel_values"), (4, 5), self.model_type)
        per_image = self._crops_per_image(inputs)
        if values.dim() == 4:
            maps = torch.cat(per_image)
            if maps.shape[0] != values.shape[0]:
                raise AdapterError(f"llava_next: {values.shape[0]} crops but the images account for {maps.shape[0]}")
        else:
            maps = torch.full((values.shape[0], values.shape[1], *values.shape[-2:]), px.NO_CELL, dtype=torch.long)
            for index, crops in enumerate(per_image):
                if crops.shape[0] > values.shape[1]:
                    raise AdapterError(
                        f"llava_next: image {index} needs {crops.shape[0]} crops, pixel_values hold {values.shape[1]}"
                    )
                maps[index, : crops.shape[0]] = crops
        return px.expand_channels(maps.to(values.device), values.shape, (values.dim() - 3,))

    def vision_token_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(real crops, class token + patches)``: the crops the model passes to its tower, in order."""
        crops = torch.cat(self._crops_per_image(inputs))
        patches = px.patch_map(crops, self.patch_size)
        device = _tensor(inputs, "pixel_values").device
        return px.with_leading_tokens(patches, self.vision_extra_tokens()).to(device)
