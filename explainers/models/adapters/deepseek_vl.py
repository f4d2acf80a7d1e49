"""DeepSeek-VL and DeepSeek-VL hybrid: Janus's layout (one padded square SigLIP input per image, one
token per patch through the aligner, the image tokens bare in the prompt).

The hybrid model also reads each image through a second, high-resolution SAM tower
(``high_res_pixel_values``) whose neck and projection convolve across neighbouring patches before
the aligner joins both towers' features token by token: a cell's token depends on the pixels of its
neighbours too, and masking ``pixel_values`` alone would leave the high-resolution view whole. So its
cells do not map back to the pixels that feed them alone: it lacks ``pixel_cells``.
"""
from __future__ import annotations

from .base import register_adapter
from .janus import SquareViewAdapter


@register_adapter
class DeepseekVLAdapter(SquareViewAdapter):
    """DeepSeek-VL: SigLIP patches of the padded square, one token each through the aligner."""

    model_types = ("deepseek_vl",)
    family = "DeepSeek-VL"


@register_adapter
class DeepseekVLHybridAdapter(SquareViewAdapter):
    """DeepSeek-VL hybrid: the low-resolution grid as DeepSeek-VL's, plus a SAM tower that mixes cells."""

    model_types = ("deepseek_vl_hybrid",)
    family = "DeepSeek-VL hybrid"

    lacks_pixel_cells = (
        "a second, high-resolution SAM tower convolves across neighbouring patches before its features join each "
        "token, so a cell's token depends on more than its own pixels, and masking pixel_values alone would leave "
        "the high-resolution view of the image whole"
    )
