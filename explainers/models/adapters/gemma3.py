"""Gemma 3: SigLIP patches average-pooled to a square grid of soft tokens per image, framed by
``<start_of_image>`` and ``<end_of_image>``.

The grid is what ``Gemma3MultiModalProjector`` computes, not ``mm_tokens_per_image`` itself: the
projector takes ``tokens_per_side = int(sqrt(mm_tokens_per_image))``, pools ``kernel =
patches_per_side // tokens_per_side`` patches a side into one token with a stride of ``kernel``,
and so writes ``(patches_per_side // kernel) ** 2`` tokens whatever ``mm_tokens_per_image`` says
(2 gives 1 x 1; 9 on an 8 x 8 patch grid gives 4 x 4). Patches past ``side * kernel`` (when the
kernel does not divide the patch grid) feed no token and map to no cell.

ShieldGemma 2 runs on Gemma 3's model class under a config of its own; its processor ignores any
text and writes one prompt per safety policy ("does the image violate ...?"). Its adapter asks the
question as the one policy to classify the image against, through the processor's own template.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import AdapterError
from . import pixels as px
from .base import GridPlan, ImagePlan, ModelAdapter, _tensor, register_adapter


@register_adapter
class Gemma3Adapter(ModelAdapter):
    """Gemma 3: one pooled ``image`` grid per vision input.

    With pan-and-scan on, every crop is a vision input of its own and gets its own layout,
    whose region is unknown (None): the processor does not report the crop boxes.
    """

    model_types = ("gemma3",)
    family = "Gemma 3"

    def _batch_plans(self, inputs: Mapping[str, Any]) -> list[ImagePlan]:
        pixels = _tensor(inputs, "pixel_values")
        if pixels is None:
            return []
        side, _kernel = self.pooled_grid()
        image_processor = getattr(self.processor, "image_processor", None)
        cropping = bool(getattr(image_processor, "do_pan_and_scan", False))
        region = None if cropping else GridPlan("image", side, side).region
        return [ImagePlan((GridPlan("image", side, side, region),)) for _ in range(pixels.shape[0])]

    def _marker_ids(self, inputs: Mapping[str, Any], row: int) -> set[int]:
        ids = (getattr(self.config, "boi_token_id", None), getattr(self.config, "eoi_token_id", None))
        return {int(i) for i in ids if i is not None}

    def pooled_grid(self) -> tuple[int, int]:
        """``(side, kernel)``: the projector's ``side x side`` token grid, each token the average of
        a ``kernel x kernel`` block of patches (read from the model's projector where it has these
        attributes, else computed from the config as the projector does)."""
        vision = self.config.vision_config
        patches = int(vision.image_size) // int(vision.patch_size)
        tokens = int(self.config.mm_tokens_per_image)
        per_side = int(tokens**0.5) if tokens > 0 else 0
        kernel = patches // per_side if 0 < per_side <= patches else 0
        try:
            projector = self.model.get_submodule(self.projector_path)
        except AttributeError:
            projector = None
        patches = int(getattr(projector, "patches_per_image", patches))
        kernel = int(getattr(projector, "kernel_size", kernel))
        if kernel < 1 or patches < kernel:
            raise AdapterError(
                f"gemma3: mm_tokens_per_image={tokens} cannot pool a {patches}x{patches} patch grid "
                f"(the projector's pooling kernel would be {kernel} patches)"
            )
        return patches // kernel, kernel

    def pooling_kernel(self) -> int:
        """Patches per side of the block the projector averages into one soft token."""
        return self.pooled_grid()[1]

    def pixel_cell_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Each pooled token covers a ``kernel x kernel`` block of patches of its vision input."""
        return px.single_view_map(self, inputs, self.model_type, self.patch_size * self.pooling_kernel())


QUESTION_POLICY = "xmllm_question"
"""The name under which ShieldGemma 2's processor is given the question as its one custom policy."""


@register_adapter
class ShieldGemma2Adapter(Gemma3Adapter):
    """ShieldGemma 2: Gemma 3's layout; the question becomes the one policy its processor classifies."""

    model_types = ("shieldgemma2",)
    family = "ShieldGemma 2"

    def _process(self, images: list[Any], question: str) -> Any:
        """One row: the image and the question as a custom policy, in the processor's own prompt."""
        if len(images) != 1:
            raise AdapterError(f"{self.model_type}: its processor classifies one image per prompt, got {len(images)}")
        kwargs: dict[str, Any] = {}
        bos = getattr(self.tokenizer, "bos_token", None)
        if bos and self._has_chat_template() and self.prompt(1, question).startswith(bos):
            kwargs["add_special_tokens"] = False  # the template writes BOS already
        return self.processor(images=images, custom_policies={QUESTION_POLICY: question},
                              policies=[QUESTION_POLICY], return_tensors="pt", **kwargs)  # fmt: skip
