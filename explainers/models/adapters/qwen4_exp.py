"""Qwen4-Exp: Qwen3-VL's ``image_grid_thw`` layout (served as the generic adapter serves Qwen3-VL and
Qwen3.5), in front of a decoder whose residual stream is ``hc_count`` hyper-connected copies of the
hidden state. The decoder has no final norm of its own: its ``hyper_connection_mixer`` normalises
each stream and mixes them into the one state the LM head reads, so that mixer is the read-out."""
from __future__ import annotations

from typing import ClassVar

from .base import register_adapter
from .generic import GenericAdapter


@register_adapter
class Qwen4ExpAdapter(GenericAdapter):
    """Qwen4-Exp: the generic ``image_grid_thw`` plans; the hyper-connection mixer as the final norm."""

    model_types = ("qwen4_exp",)
    family: ClassVar[str] = "Qwen4-Exp"
    kind: ClassVar[str] = "own"

    final_norm_attr: ClassVar[str] = "hyper_connection_mixer"
