"""DeepSeek-OCR 2: each view of an image (local tiles when the processor crops, then the padded
global square) goes through a SAM encoder and its strided convolutions, then an encoder in which a
table of learned queries reads all of the view's patches; the queries become the view's image tokens
(the smaller table when the view has at most as many patches as it has queries, else the larger),
and a learned separator ends each image. No query belongs to a region of the image: each view's
queries are laid out as one strip (``local_{k}``, ``global``) with no region, the separator as an
extra; the family lacks ``pixel_cells``."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..errors import AdapterError
from . import pixels as px
from .base import ExtraPlan, GridPlan, ImagePlan, ModelAdapter, _tensor, register_adapter

SEPARATOR = "view_separator"


@register_adapter
class DeepseekOcr2Adapter(ModelAdapter):
    """DeepSeek-OCR 2: per view a strip of the encoder's queries, then the image's separator."""

    model_types = ("deepseek_ocr2",)
    family = "DeepSeek-OCR 2"

    vision_layers_candidates = ("sam_encoder.layers",)
    vision_attn_candidates = ("attn",)

    lacks_pixel_cells: ClassVar[str | None] = (
        "its image tokens are learned queries of a vision encoder that reads all of a view's patches, so no image "
        "token belongs to a cell of the image"
    )

    @property
    def patch_size(self) -> int:
        return int(self.config.vision_config.sam_config.patch_size)

    def _stride(self) -> int:
        """Pixels per side of one patch after the SAM encoder's convolutions (patch embedding included)."""
        stride = 1
        for module in self.vision_tower.get_submodule("sam_encoder").modules():
            if isinstance(module, torch.nn.Conv2d):
                stride *= int(module.stride[0])
        return stride

    def _queries(self, height: int, width: int) -> int:
        """Queries the encoder gives a view of ``height`` x ``width`` pixels, by the tower's own rule."""
        stride = self._stride()
        patches = (height // stride) * (width // stride)
        tables = sorted(
            int(m.num_embeddings) for name, m in self.vision_tower.named_children()
            if isinstance(m, torch.nn.Embedding) and name.startswith("query_")
        )  # fmt: skip
        if not tables:
            raise AdapterError(f"{self.model_type}: the vision tower has no query tables")
        return tables[0] if patches <= tables[0] else tables[-1]

    def _batch_plans(self, inputs: Mapping[str, Any]) -> list[ImagePlan]:
        pixels = _tensor(inputs, "pixel_values")
        if pixels is None:
            return []
        pixels = px.check_pixels(pixels, (4,), self.model_type)
        global_queries = self._queries(*pixels.shape[-2:])
        local = _tensor(inputs, "pixel_values_local")
        local_queries = self._queries(*local.shape[-2:]) if local is not None and local.numel() else 0
        counts = _tensor(inputs, "num_local_patches")
        counts = counts.flatten().tolist() if counts is not None else [0] * pixels.shape[0]
        if len(counts) != pixels.shape[0]:
            raise AdapterError(f"{self.model_type}: {pixels.shape[0]} global views but {len(counts)} local counts")
        plans = []
        for crops in counts:
            strips = [GridPlan(f"local_{k}", 1, local_queries, None) for k in range(1, int(crops) + 1)]
            strips.append(GridPlan("global", 1, global_queries, None))
            plans.append(ImagePlan((*strips, ExtraPlan(SEPARATOR, 1))))
        return plans

    def vision_token_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(views, rows, cols)`` of -1, as the SAM blocks keep each view's patch grid: no patch feeds
        one decoder position alone."""
        pixels = px.check_pixels(_tensor(inputs, "pixel_values"), (4,), self.model_type)
        patch = self.patch_size
        shape = (pixels.shape[0], pixels.shape[-2] // patch, pixels.shape[-1] // patch)
        return torch.full(shape, -1, dtype=torch.long, device=pixels.device)
