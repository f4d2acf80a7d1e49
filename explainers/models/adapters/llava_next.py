"""LLaVA-NeXT (any-res): a base view of the whole image, then its high-resolution tiles stitched
into one grid, unpadded, with an ``image_newline`` feature closing every row of that grid.

LLaVA-NeXT-Video writes images exactly so; LLaVA-OneVision too, except that it shrinks the
stitched grid (bilinearly) past ``anyres_max_N`` tiles' worth and lays an image that is one of
several in a sample out as its base view and one newline.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import AdapterError
from . import pixels as px
from .base import ExtraPlan, GridPlan, ImagePlan, ModelAdapter, _tensor, register_adapter

NEWLINE = "image_newline"
"""Reason given for the learned row-separator features in ``ImageLayout.extra_positions``."""


@register_adapter
class LlavaNextAdapter(ModelAdapter):
    """LLaVA-NeXT: grids ``base`` (one vision input) and ``tiles`` (the unpadded any-res grid)."""

    model_types = ("llava_next",)
    family = "LLaVA-NeXT"

    @property
    def _side(self) -> int:
        """Patches per side of one vision input (a tile or the base view)."""
        vision = self.config.vision_config
        return int(vision.image_size) // int(vision.patch_size)

    def _tile_counts(self, image_size: list[int]) -> tuple[int, int]:
        """Tiles high and wide of the image's best any-res resolution, as the model chooses it."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        high, wide = get_anyres_image_grid_shape(
            image_size, self.config.image_grid_pinpoints, self.config.vision_config.image_size
        )
        return int(high), int(wide)

    def _stitched_cells(self, image_size: list[int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """For every cell of the stitched tile grid, the index (row-major) of the ``tiles`` cell
        it feeds (-1: removed by unpadding), and the ``tiles`` grid's (rows, cols).

        The indices go through the model's own ``unpad_image``, so the cells it removes (the
        letterbox padding) drop out and the kept ones line up with ``tiles``.
        """
        from transformers.models.llava_next.modeling_llava_next import unpad_image

        side = self._side
        high, wide = self._tile_counts(image_size)
        stitched = torch.arange(high * side * wide * side).view(1, high * side, wide * side)
        kept = unpad_image(stitched, image_size)[0]
        cell_of = torch.full((stitched.numel(),), px.NO_CELL, dtype=torch.long)
        cell_of[kept.flatten()] = torch.arange(kept.numel())
        return cell_of.view(high * side, wide * side), (int(kept.shape[0]), int(kept.shape[1]))

    def _tile_grid(self, image_size: list[int]) -> tuple[int, int]:
        """Rows and columns of the stitched, unpadded tile grid, exactly as the model computes them."""
        return self._stitched_cells(image_size)[1]

    def _image_sizes(self, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        sizes = _tensor(inputs, "image_sizes")
        if sizes is None and _tensor(inputs, "pixel_values") is not None:
            raise AdapterError(f"{self.model_type}: inputs have pixel_values but no image_sizes")
        return sizes

    def _tiled(self, inputs: Mapping[str, Any], count: int) -> list[bool]:
        """Whether each image of the batch is split into tiles (always, for LLaVA-NeXT)."""
        return [True] * count

    def _batch_plans(self, inputs: Mapping[str, Any]) -> list[ImagePlan]:
        sizes = self._image_sizes(inputs)
        if sizes is None:
            return []
        side = self._side
        plans = []
        for size, tiled in zip(sizes.tolist(), self._tiled(inputs, sizes.shape[0]), strict=True):
            base = GridPlan("base", side, side)
            if not tiled:  # OneVision, one of several images: the base view, then one newline
                plans.append(ImagePlan((base, ExtraPlan(NEWLINE, 1))))
                continue
            rows, cols = self._tile_grid([int(v) for v in size])
            plans.append(ImagePlan((base, GridPlan("tiles", rows, cols, row_suffix=NEWLINE))))
        return plans

    def _crop_maps(
        self, layout: Any, image_size: list[int], tiled: bool, height: int, width: int
    ) -> torch.Tensor:
        """``(crops, H, W)``: the base view's cells, then each tile's cells of the stitched grid."""
        side, patch = self._side, self.patch_size
        maps = [px.block_map(height, width, px.grid_cells(layout.grid("base")), patch, patch)]
        if not tiled:
            return torch.stack(maps)
        cell_of, shape = self._stitched_cells(image_size)
        tiles = layout.grid("tiles")
        if shape != (tiles.rows, tiles.cols):
            raise AdapterError(
                f"{self.model_type}: the model keeps {shape[0]}x{shape[1]} tile cells, the layout has "
                f"{tiles.rows}x{tiles.cols}"
            )
        positions = torch.where(cell_of >= 0, tiles.positions[cell_of.clamp_min(0)], px.NO_CELL)
        high, wide = self._tile_counts(image_size)
        for tile in range(high * wide):
            top, left = (tile // wide) * side, (tile % wide) * side
            maps.append(px.block_map(height, width, positions[top : top + side, left : left + side], patch, patch))
        return torch.stack(maps)

    def _crops_per_image(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        values = px.check_pixels(_tensor(inputs, "pixel_values"), (4, 5), self.model_type)
        sizes = _tensor(inputs, "image_sizes")
        layouts = px.flat_layouts(self, inputs)
        if sizes is None or len(layouts) != sizes.shape[0]:
            given = 0 if sizes is None else sizes.shape[0]
            raise AdapterError(f"{self.model_type}: {len(layouts)} image layouts but image_sizes for {given}")
        height, width = values.shape[-2:]
        tiled = self._tiled(inputs, len(layouts))
        return [
            self._crop_maps(layout, [int(v) for v in size], tile, height, width)
            for layout, size, tile in zip(layouts, sizes.tolist(), tiled, strict=True)
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
                raise AdapterError(
                    f"{self.model_type}: {values.shape[0]} crops but the images account for {maps.shape[0]}"
                )
        else:
            maps = torch.full((values.shape[0], values.shape[1], *values.shape[-2:]), px.NO_CELL, dtype=torch.long)
            for index, crops in enumerate(per_image):
                if crops.shape[0] > values.shape[1]:
                    raise AdapterError(
                        f"{self.model_type}: image {index} needs {crops.shape[0]} crops, pixel_values hold "
                        f"{values.shape[1]}"
                    )
                maps[index, : crops.shape[0]] = crops
        return px.expand_channels(maps.to(values.device), values.shape, (values.dim() - 3,))

    def vision_token_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(real crops, class token + patches)``: the crops the model passes to its tower, in order."""
        crops = torch.cat(self._crops_per_image(inputs))
        patches = px.patch_map(crops, self.patch_size)
        device = _tensor(inputs, "pixel_values").device
        return px.with_leading_tokens(patches, self.vision_extra_tokens()).to(device)


@register_adapter
class LlavaNextVideoAdapter(LlavaNextAdapter):
    """LLaVA-NeXT-Video: images take LLaVA-NeXT's path unchanged (videos have their own tokens)."""

    model_types = ("llava_next_video",)
    family = "LLaVA-NeXT-Video"


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: LLaVA-NeXT's grids, the ``tiles`` grid shrunk as the model shrinks it.

    Past ``anyres_max_N`` (the config's ``vision_aspect_ratio``) tiles' worth of cells, the model
    resizes the unpadded grid bilinearly to ``int(rows // r) x int(cols // r)``; each cell of the
    unpadded grid then maps to the shrunk cell whose area holds its centre, the one its features
    weigh most in (bilinear resizing also spills some into the neighbouring cells). An image that
    is one of several in a sample (``batch_num_images`` above 1) is its base view and one newline.
    """

    model_types = ("llava_onevision",)
    family = "LLaVA-OneVision"

    def _max_tiles(self) -> int:
        aspect = str(getattr(self.config, "vision_aspect_ratio", "anyres_max_9"))
        # the model's own parse of "anyres_max_N"
        try:
            return int(aspect.strip("anyres_max_"))
        except ValueError:
            raise AdapterError(f"{self.model_type}: cannot read a tile budget from vision_aspect_ratio {aspect!r}")

    def _stitched_cells(self, image_size: list[int]) -> tuple[torch.Tensor, tuple[int, int]]:
        cell_of, (rows, cols) = super()._stitched_cells(image_size)
        side = self._side
        ratio = math.sqrt(rows * cols / (self._max_tiles() * side**2))
        if ratio <= 1.1:  # the model's threshold
            return cell_of, (rows, cols)
        new_rows, new_cols = int(rows // ratio), int(cols // ratio)
        # unpadded cell (r, c) -> the shrunk cell whose area holds its centre
        row_to = ((torch.arange(rows) + 0.5) * new_rows / rows).floor().long().clamp(max=new_rows - 1)
        col_to = ((torch.arange(cols) + 0.5) * new_cols / cols).floor().long().clamp(max=new_cols - 1)
        shrunk = (row_to[:, None] * new_cols + col_to[None, :]).flatten()
        kept = cell_of >= 0
        remapped = cell_of.clone()
        remapped[kept] = shrunk[cell_of[kept]]
        return remapped, (new_rows, new_cols)

    def _tiled(self, inputs: Mapping[str, Any], count: int) -> list[bool]:
        per_sample = _tensor(inputs, "batch_num_images")
        if per_sample is None:  # the model treats every image as a single one
            return [True] * count
        tiled = [int(n) == 1 for n in per_sample.flatten().tolist() for _ in range(int(n))]
        if len(tiled) != count:
            raise AdapterError(f"{self.model_type}: batch_num_images account for {len(tiled)} images, not {count}")
        return tiled
