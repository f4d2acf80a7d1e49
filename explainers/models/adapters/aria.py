"""Aria: each view of an image (the padded square, or each crop with ``split_image``) goes through
the vision tower whole; the projector's learned queries then cross-attend over all of the view's
patches, so every image token is one query (``projector_patch_to_query_dict`` gives how many a view
of that many patches gets) and none belongs to a region of the image. Each view's queries are laid
out as one strip ``queries_{k}`` (1 x queries, in query order) with no region on the image: maps over
image tokens show the queries, never drawn over pixels; the family lacks ``pixel_cells``."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..errors import AdapterError
from . import pixels as px
from .base import GridPlan, ImagePlan, ModelAdapter, _tensor, register_adapter



@register_adapter
class AriaAdapter(ModelAdapter):
    """Aria: per view, a strip of the projector's queries with no region; vision blocks of the Idefics3 tower."""

    model_types = ("aria",)
    family = "Aria"

    vision_layers_candidates = ("encoder.layers",)

    lacks_pixel_cells: ClassVar[str | None] = (
        "its image tokens are the projector's learned queries, each cross-attending over all of a view's patches, "
        "so no image token belongs to a cell of the image"
    )

    def _queries(self, patches: int) -> int:
        table = {int(k): int(v) for k, v in dict(self.config.projector_patch_to_query_dict).items()}
        if patches not in table:
            raise AdapterError(
                f"{self.model_type}: a view of {patches} patches has no query count in projector_patch_to_query_dict "
                f"({sorted(table)})"
            )
        return table[patches]

    def _batch_plans(self, inputs: Mapping[str, Any]) -> list[ImagePlan]:
        pixels = _tensor(inputs, "pixel_values")
        if pixels is None:
            return []
        pixels = px.check_pixels(pixels, (4,), self.model_type)
        patch = self.patch_size
        per_view = self._queries((pixels.shape[-2] // patch) * (pixels.shape[-1] // patch))
        views = pixels.shape[0]
        ids = self._input_ids(inputs)
        counts = (ids == self.image_token_id).sum(dim=-1).tolist()
        total = sum(counts)
        if total % per_view or total // per_view != views:
            raise AdapterError(
                f"{self.model_type}: {total} image tokens are not {views} views of {per_view} queries"
            )
        # views per image: the processor pads every image to the batch's largest crop count
        crops = _tensor(inputs, "num_crops")
        per_image = int(crops.max()) if crops is not None and crops.numel() else 1
        images = views // per_image
        strips = tuple(GridPlan(f"queries_{k}", 1, per_view, None) for k in range(1, per_image + 1))
        return [ImagePlan(strips) for _ in range(images)]

    def vision_token_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(views, patches)`` of -1: no vision token feeds one decoder position alone."""
        pixels = px.check_pixels(_tensor(inputs, "pixel_values"), (4,), self.model_type)
        patch = self.patch_size
        patches = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
        return torch.full((pixels.shape[0], patches), -1, dtype=torch.long, device=pixels.device)
