"""HY V4 VL (Hy4): HunYuan-VL's tower and merger without the learned begin/end features (each image
is its merged grid, a learned newline feature ending every row), on a decoder with
hyper-connections: its blocks carry ``hc_mult`` residual streams ``(batch, tokens, streams,
hidden)`` that a learned head collapses before the final norm, so the read-out applies that head to
a block's streams as the model's forward does. Neither the config nor the processor names the
tokens around an image, so there are no markers."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from .base import register_adapter
from .hunyuan_vl import HunYuanVLAdapter


@register_adapter
class HYV4VLAdapter(HunYuanVLAdapter):
    """HY V4 VL: HunYuan-VL's grids with row newlines only; the hyper-connection head in the read-out."""

    model_types = ("hy_v4_vl",)
    family = "HY V4 VL"

    begin_end_features: ClassVar[bool] = False

    def _marker_ids(self, inputs: Mapping[str, Any], row: int) -> set[int]:
        return set()

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Streams ``(..., hc_mult, hidden)`` are collapsed by the model's hyper-connection head first."""
        streams = int(getattr(self.config.get_text_config(), "hc_mult", 1) or 1)
        head = getattr(self.language_model, "hc_head", None)
        if head is not None and streams > 1 and hidden.dim() >= 2 and hidden.shape[-2] == streams:
            lead = hidden.shape[:-2]
            flat = hidden.reshape(-1, 1, streams, hidden.shape[-1])
            hidden = head(flat).reshape(*lead, hidden.shape[-1])
        return super().unembed(hidden)
