"""Qianfan-OCR: InternVL's layout (GotOcr2's tiles and thumbnail, each crop's patches, class token
dropped, pixel-shuffled by ``downsample_ratio``, the crops between ``<img>`` and ``</img>``) on a
vision tower whose blocks sit directly at ``layers``."""
from __future__ import annotations

from .base import register_adapter
from .internvl import InternVLAdapter


@register_adapter
class QianfanOCRAdapter(InternVLAdapter):
    """Qianfan-OCR: InternVL's tiles and pixel shuffle; the tower's blocks at ``layers``."""

    model_types = ("qianfan_ocr",)
    family = "Qianfan-OCR"

    vision_layers_candidates = ("layers",)
