"""Idefics3 and SmolVLM: a large image is split into tiles of the vision encoder's size plus a
downscaled global view; each tile's patches are pixel-shuffled (``scale_factor``) into a square
of decoder tokens. The processor tags each tile's run with ``<row_r_col_c>`` (the global view
with its global-image tag) between ``<fake_token_around_image>`` tokens."""
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

    def _tile_side(self) -> int:
        vision = self.config.vision_config
        return int(vision.image_size) // int(vision.patch_size) // int(self.config.scale_factor)

    def _runs(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """The image-token positions of one row, one tensor per tile, each checked contiguous."""
        positions = torch.nonzero(ids == self.image_token_id).flatten()
        per_tile = self._tile_side() ** 2
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

    def _row_plans(self, inputs: Mapping[str, Any], row: int) -> list[ImagePlan]:
        ids = self._input_ids(inputs)[row]
        side = self._tile_side()
        plans: list[ImagePlan] = []
        tiles: list[tuple[int, int]] = []
        for run in self._runs(ids):
            tag = int(ids[int(run[0]) - 1])
            if tag != self.global_token_id:
                tiles.append(self._tile_of(tag))
                continue
            rows = max((r for r, _ in tiles), default=0)
            cols = max((c for _, c in tiles), default=0)
            parts = [
                GridPlan(f"tile_{r}_{c}", side, side, ((r - 1) / rows, (c - 1) / cols, r / rows, c / cols))
                for r, c in tiles
            ]
            parts.append(GridPlan(GLOBAL, side, side))
            plans.append(ImagePlan(tuple(parts)))
            tiles = []
        if tiles:
            raise AdapterError(f"{self.model_type}: tiles without a global image at the end of row {row}")
        return plans

    def _marker_ids(self, inputs: Mapping[str, Any], row: int) -> set[int]:
        ids = self._input_ids(inputs)[row]
        markers = {i for i in (self.fake_token_id, self.global_token_id) if i is not None}
        if bool((ids == self.image_token_id).any()):
            markers |= {int(ids[int(run[0]) - 1]) for run in self._runs(ids)}
        return markers

    def _token_of_patch(self, patches: int) -> torch.Tensor:
        """``(patches,)``: the tile token each patch is pixel-shuffled into, by the connector itself."""
        index = torch.arange(patches).view(1, patches, 1)
        shuffled = self.projector.pixel_shuffle(index, int(self.config.scale_factor))[0]
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
        token_of = self._token_of_patch(rows * cols)
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
                if mask is not None:
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
