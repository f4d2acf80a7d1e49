"""Families that report each image's patch grid as ``image_grid_thw`` (Qwen2-VL and its heirs:
Qwen2.5/3-VL, Qwen3.5, GLM-4V, ...): ``merge x merge`` patches fuse into one decoder token,
row-major over the merged grid, and ``pixel_values`` holds flattened patches ``(patches, C*T*P*P)``
merge window by merge window. Shared by their own adapter and the generic one."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import AdapterError
from . import pixels as px
from .base import GridPlan, ImagePlan, _tensor


def thw_plans(adapter: Any, inputs: Mapping[str, Any], merge: int) -> list[ImagePlan]:
    """One merged grid per image (one per frame when ``t`` > 1)."""
    grid_thw = _tensor(inputs, "image_grid_thw")
    if grid_thw is None:
        if _tensor(inputs, "pixel_values") is not None:
            raise AdapterError(f"{adapter.model_type}: inputs have pixel_values but no image_grid_thw")
        return []
    plans = []
    for frames, height, width in grid_thw.tolist():
        rows, cols = int(height) // merge, int(width) // merge
        if frames == 1:
            plans.append(ImagePlan((GridPlan("image", rows, cols),)))
        else:
            plans.append(ImagePlan(tuple(GridPlan(f"frame_{t}", rows, cols) for t in range(int(frames)))))
    return plans


def thw_patch_positions(adapter: Any, inputs: Mapping[str, Any], merge: int) -> torch.Tensor:
    """``(patches,)``: the position of the merged token each row of ``pixel_values`` feeds."""
    grid_thw = _tensor(inputs, "image_grid_thw")
    if grid_thw is None:
        raise AdapterError(f"{adapter.model_type}: inputs have no image_grid_thw")
    unit = merge * merge
    rows = []
    for layout, (frames, height, width) in zip(px.flat_layouts(adapter, inputs), grid_thw.tolist(), strict=True):
        tokens = torch.cat([grid.positions for grid in layout.grids])
        if int(frames) * int(height) * int(width) != tokens.numel() * unit:
            raise AdapterError(
                f"{adapter.model_type}: a {frames}x{height}x{width} patch grid does not merge into "
                f"{tokens.numel()} tokens"
            )
        rows.append(tokens.repeat_interleave(unit))
    return torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)


def thw_pixel_cell_map(adapter: Any, inputs: Mapping[str, Any], merge: int) -> torch.Tensor:
    """Each flattened patch row of ``pixel_values`` maps to its merged token."""
    values = px.check_pixels(_tensor(inputs, "pixel_values"), (2,), adapter.model_type)
    rows = thw_patch_positions(adapter, inputs, merge)
    if rows.numel() != values.shape[0]:
        raise AdapterError(
            f"{adapter.model_type}: {values.shape[0]} patch rows but image_grid_thw accounts for {rows.numel()}"
        )
    return px.expand_channels(rows.to(values.device), values.shape, (1,))
