"""Idefics3 and SmolVLM: a large image is split into tiles of the vision encoder's size plus a
downscaled global view; each tile's patches are pixel-shuffled (``scale_factor``) into a square
of decoder tokens. The processor tags each tile's run with ``<row_r_col_c>`` (the global view
with its global-image tag) between ``<fake_token_around_image>`` tokens.

Granite Docling tiles and tags the same way, with three differences its adapter reads: the pixel
shuffle lives in the vision model's connector, at ``vision_config.scale_factor`` or, on the fine
route (inputs with ``tile_fine_mask``), half of it (four times the tokens a tile); an image left
whole is one ``<row_1_col_1>`` tile with no global view; and ``pixel_attention_mask`` marks real
tiles, not real pixels. Its muP decoder divides the logits by ``logits_scaling``, which its logit
lens applies too."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import AdapterError
from . import pixels as px
from .base import GridPlan, ImagePlan, ModelAdapter, _tensor, register_adapter

TILE_TAG = re.compile(r"<row_(\d+)_col_(\d+)>")
"""How the Idefics3 / SmolVLM processors name a tile (1-based row and column)."""
GLOBAL = "global"


@register_adapter
class Idefics3Adapter(ModelAdapter):
    """Idefics3 / SmolVLM: grids ``tile_{r}_{c}`` (1-based, as the processor tags them) and ``global``."""

    model_types = ("idefics3", "smolvlm")
    family = "Idefics3"

    vision_tower_path = "model.vision_model"
    projector_path = "model.connector"
    language_model_path = "model.text_model"

    def _token_id(self, *names: str) -> int | None:
        """A processor's special token id, given as an id attribute or as a token string."""
        for name in names:
            value = getattr(self.processor, name, None)
            if isinstance(value, int):
                return value
            if isinstance(value, str):
                token_id = self.tokenizer.convert_tokens_to_ids(value)
                if token_id is not None and token_id != getattr(self.tokenizer, "unk_token_id", None):
                    return int(token_id)
        return None

    @property
    def global_token_id(self) -> int | None:
        return self._token_id("global_image_token_id", "global_image_tag", "global_image_token")

    @property
    def fake_token_id(self) -> int | None:
        return self._token_id("fake_image_token_id", "fake_image_token")

    def _scale_factor(self, inputs: Mapping[str, Any]) -> int:
        """Patches per side the connector's pixel shuffle fuses into one token."""
        return int(self.config.scale_factor)

    def _shuffler(self, inputs: Mapping[str, Any]) -> Any:
        """The module whose ``pixel_shuffle(x, scale_factor)`` the connector applies."""
        return self.projector

    def _tile_side(self, inputs: Mapping[str, Any]) -> int:
        vision = self.config.vision_config
        return int(vision.image_size) // int(vision.patch_size) // self._scale_factor(inputs)

    def _runs(self, ids: torch.Tensor, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """The image-token positions of one row, one tensor per tile, each checked contiguous."""
        positions = torch.nonzero(ids == self.image_token_id).flatten()
        per_tile = self._tile_side(inputs) ** 2
        if positions.numel() % per_tile:
            raise AdapterError(f"{self.model_type}: {positions.numel()} image tokens are not whole tiles of {per_tile}")
        runs = list(positions.split(per_tile))
        for run in runs:
            if int(run[-1] - run[0]) != per_tile - 1 or int(run[0]) == 0:
                raise AdapterError(f"{self.model_type}: a tile's {per_tile} image tokens are not one tagged run")
        return runs

    def _tile_of(self, tag_id: int) -> tuple[int, int]:
        match = TILE_TAG.fullmatch(str(self.tokenizer.convert_ids_to_tokens(tag_id)))
        if match is None:
            raise AdapterError(
                f"{self.model_type}: token {tag_id} before a tile is neither a tile tag nor the global tag"
            )
        return int(match.group(1)), int(match.group(2))

    # Whether an image may be tiles alone, with no global view after them (Granite Docling's unsplit image).
    tiles_without_global: bool = False

    def _row_plans(self, inputs: Mapping[str, Any], row: int) -> list[ImagePlan]:
        ids = self._input_ids(inputs)[row]
        side = self._tile_side(inputs)
        plans: list[ImagePlan] = []
        tiles: list[tuple[int, int]] = []

        def image(with_global: bool) -> ImagePlan:
            rows = max((r for r, _ in tiles), default=0)
            cols = max((c for _, c in tiles), default=0)
            parts = [
                GridPlan(f"tile_{r}_{c}", side, side, ((r - 1) / rows, (c - 1) / cols, r / rows, c / cols))
                for r, c in tiles
            ]
            if with_global:
                parts.append(GridPlan(GLOBAL, side, side))
            return ImagePlan(tuple(parts))

        for run in self._runs(ids, inputs):
            tag = int(ids[int(run[0]) - 1])
            if tag != self.global_token_id:
                tile = self._tile_of(tag)
                if tile == (1, 1) and tiles and self.tiles_without_global:  # a new image's first tile
                    plans.append(image(with_global=False))
                    tiles = []
                tiles.append(tile)
                continue
            plans.append(image(with_global=True))
            tiles = []
        if tiles:
            if not self.tiles_without_global:
                raise AdapterError(f"{self.model_type}: tiles without a global image at the end of row {row}")
            plans.append(image(with_global=False))
        return plans

    def _marker_ids(self, inputs: Mapping[str, Any], row: int) -> set[int]:
        ids = self._input_ids(inputs)[row]
        markers = {i for i in (self.fake_token_id, self.global_token_id) if i is not None}
        if bool((ids == self.image_token_id).any()):
            markers |= {int(ids[int(run[0]) - 1]) for run in self._runs(ids, inputs)}
        return markers

    def _token_of_patch(self, patches: int, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(patches,)``: the tile token each patch is pixel-shuffled into, by the connector itself."""
        index = torch.arange(patches).view(1, patches, 1)
        shuffled = self._shuffler(inputs).pixel_shuffle(index, self._scale_factor(inputs))[0]
        token_of = torch.empty(patches, dtype=torch.long)
        token_of[shuffled.flatten()] = torch.arange(shuffled.shape[0]).repeat_interleave(shuffled.shape[1])
        return token_of

    def _tile_maps(self, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, list[int]]:
        """``(batch, views, H, W)`` maps and, per batch row, how many views are real tiles."""
        values = px.check_pixels(_tensor(inputs, "pixel_values"), (5,), self.model_type)
        mask = _tensor(inputs, "pixel_attention_mask")
        batch, views, height, width = values.shape[0], values.shape[1], values.shape[-2], values.shape[-1]
        patch = self.patch_size
        rows, cols = height // patch, width // patch
        token_of = self._token_of_patch(rows * cols, inputs)
        per_pixel = mask is not None and mask.dim() == values.dim() - 1  # else a mask of real tiles
        maps = torch.full((batch, views, height, width), px.NO_CELL, dtype=torch.long)
        real = []
        for row, layouts in enumerate(px.batch_layouts(self, inputs)):
            grids = [grid for layout in layouts for grid in layout.grids]
            if len(grids) > views:
                raise AdapterError(f"{self.model_type}: row {row} has {len(grids)} tiles but pixel_values hold {views}")
            for view, grid in enumerate(grids):
                if grid.size != int(token_of.max()) + 1:
                    raise AdapterError(
                        f"{self.model_type}: {rows}x{cols} patches do not shuffle into {grid.size} tokens"
                    )
                cells = grid.positions[token_of].view(rows, cols)
                maps[row, view] = px.block_map(height, width, cells, patch, patch)
                if per_pixel:
                    maps[row, view][mask[row, view].cpu() == 0] = px.NO_CELL
            real.append(len(grids))
        return maps, real

    def pixel_cell_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Tiles then the global view, per batch row; each patch maps to the token it is shuffled into.

        Padding views (the model drops all-zero ones) and masked padding pixels get -1.
        """
        values = px.check_pixels(_tensor(inputs, "pixel_values"), (5,), self.model_type)
        maps, _ = self._tile_maps(inputs)
        return px.expand_channels(maps.to(values.device), values.shape, (2,))

    def vision_token_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(real tiles, patches)``: the tiles the model keeps, in batch order."""
        maps, real = self._tile_maps(inputs)
        kept = torch.cat([maps[row, :count] for row, count in enumerate(real)])
        return px.patch_map(kept, self.patch_size).to(_tensor(inputs, "pixel_values").device)


@register_adapter
class GraniteDoclingAdapter(Idefics3Adapter):
    """Granite Docling: Idefics3's tiles and tags; the shuffle in the connector's coarse or fine path."""

    model_types = ("granite_docling",)
    family = "Granite Docling"

    projector_path = "model.vision_model.connector"
    tiles_without_global = True

    @staticmethod
    def _fine(inputs: Mapping[str, Any]) -> bool:
        return _tensor(inputs, "tile_fine_mask") is not None

    def _scale_factor(self, inputs: Mapping[str, Any]) -> int:
        scale = int(self.config.vision_config.scale_factor)
        return scale // 2 if self._fine(inputs) else scale

    def _shuffler(self, inputs: Mapping[str, Any]) -> Any:
        path = self.projector.fine if self._fine(inputs) else self.projector.coarse
        if path is None:
            raise AdapterError(f"{self.model_type}: inputs ask for the fine route but the model has no fine path")
        return path

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head, then the division by ``logits_scaling`` its muP forward applies."""
        scale = float(getattr(self.config.get_text_config(), "logits_scaling", 1.0) or 1.0)
        return super().unembed(hidden) / scale
