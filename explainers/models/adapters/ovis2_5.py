"""Ovis2.5: ``image_grid_thw`` patches fused ``spatial_merge_size`` x ``spatial_merge_size`` into one
decoder token each, but in the vision tower's *window* order: the tower reorders merge units into
attention windows (Qwen2.5-VL's ``get_vision_window_index``) and the visual tokenizer reads the last
encoder layer's states, which are still in that order, so the image's decoder tokens run window by
window. The image sits between ``image_start_token_id`` and ``image_end_token_id``, whose embeddings
are learned visual indicators (markers)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from . import pixels as px
from ..layout import ImageLayout, PatchGrid
from .base import _tensor, register_adapter
from .generic import GenericAdapter
from .thw import thw_patch_positions


@register_adapter
class Ovis2_5Adapter(GenericAdapter):
    """Ovis2.5: the generic ``image_grid_thw`` plans, each image's tokens permuted into window order."""

    model_types = ("ovis2_5",)
    family: ClassVar[str] = "Ovis2.5"
    kind: ClassVar[str] = "own"

    def _window_index(self, frames: int, height: int, width: int) -> torch.Tensor:
        """Merge unit (row-major over the merged grid) of each of one image's tokens, in the
        order the tower puts them: the order its features reach the decoder."""
        from transformers.vision_utils import get_vision_window_index

        vision = self.config.vision_config
        index, _ = get_vision_window_index(
            torch.tensor([[frames, height, width]]),
            spatial_merge_size=int(vision.spatial_merge_size),
            window_size=int(vision.window_size),
            patch_size=int(vision.patch_size),
        )
        return index

    def image_layouts(
        self,
        inputs: Mapping[str, Any],
        row: int = 0,
        *,
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[ImageLayout]:
        merge = int(self.config.vision_config.spatial_merge_size)
        layouts = []
        for layout in super().image_layouts(inputs, row, image_sizes=image_sizes):
            grids = layout.grids
            if not grids:
                layouts.append(layout)
                continue
            tokens = torch.cat([grid.positions for grid in grids])  # in sequence (window) order
            first = grids[0]
            order = self._window_index(len(grids), first.rows * merge, first.cols * merge)
            cells = tokens[torch.argsort(order).to(tokens.device)]  # cell u -> the token holding unit u
            moved, start = [], 0
            for grid in grids:
                end = start + grid.size
                moved.append(PatchGrid(grid.name, grid.rows, grid.cols, cells[start:end], grid.region))
                start = end
            layouts.append(ImageLayout(layout.image_index, tuple(moved), layout.extra_positions,
                                       layout.marker_positions))  # fmt: skip
        return layouts

    def _marker_ids(self, inputs: Mapping[str, Any], row: int) -> set[int]:
        ids = (getattr(self.config, "image_start_token_id", None), getattr(self.config, "image_end_token_id", None))
        return {int(i) for i in ids if i is not None}

    def vision_token_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(patches,)`` in the order the vision blocks see them: merge units in window order."""
        values = px.check_pixels(_tensor(inputs, "pixel_values"), (2,), self.model_type)
        merge = int(self.config.vision_config.spatial_merge_size)
        rows = thw_patch_positions(self, inputs, merge)
        grid_thw = _tensor(inputs, "image_grid_thw")
        from transformers.vision_utils import get_vision_window_index

        vision = self.config.vision_config
        order, _ = get_vision_window_index(grid_thw.cpu(), spatial_merge_size=merge,
                                           window_size=int(vision.window_size), patch_size=int(vision.patch_size))  # fmt: skip
        unit = merge * merge
        return rows.view(-1, unit)[order].reshape(-1).to(values.device)
