"""Idefics2: each view of an image (with splitting on: four crops, then the whole image) goes through
SigLIP, then a perceiver resampler whose learned latent queries each attend over all of that view's
patches. The decoder's image tokens are those latents, one run per view between
``<fake_token_around_image>`` tokens; a latent is not a cell of the image and maps to no pixels.

Each view's latents are laid out as a ``1 x latents`` grid (``crop_1`` ... then ``image`` for the
whole image), with no region on the picture, so explainers that score image tokens score latents;
those that need pixels refuse (:attr:`lacks_pixel_cells`)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import AdapterError
from .base import GridPlan, ImagePlan, ModelAdapter, register_adapter


@register_adapter
class Idefics2Adapter(ModelAdapter):
    """Idefics2: one ``1 x latents`` grid per view, views grouped into images by their runs."""

    model_types = ("idefics2",)
    family = "Idefics2"

    vision_tower_path = "model.vision_model"
    projector_path = "model.connector"
    language_model_path = "model.text_model"

    lacks_pixel_cells = (
        "a perceiver resampler reads each view into learned latents, each attending over all of the view's "
        "patches: its image tokens are latents, not cells, and map back to no pixels of their own"
    )

    @property
    def latents(self) -> int:
        """Image tokens per view: the resampler's latent queries."""
        return int(self.config.perceiver_config.resampler_n_latents)

    @property
    def fake_token_id(self) -> int | None:
        token = getattr(self.processor, "fake_image_token", None)
        if token is None:
            return None
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        return None if token_id is None or token_id == getattr(self.tokenizer, "unk_token_id", None) else int(token_id)

    @property
    def views_per_image(self) -> int:
        """Views the processor makes of each image: four crops and the whole image when it splits
        images, else the whole image alone."""
        splitting = getattr(getattr(self.processor, "image_processor", None), "do_image_splitting", False)
        return 5 if splitting else 1

    def _views(self, ids: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per image of the row, its views' image-token positions: runs of ``latents`` tokens, taken
        :attr:`views_per_image` at a time (adjacent images are framed by the same boundary token as
        one image's views, so the boundary cannot tell them apart)."""
        positions = torch.nonzero(ids == self.image_token_id).flatten()
        if positions.numel() == 0:
            return []
        breaks = torch.nonzero(positions[1:] - positions[:-1] != 1).flatten() + 1
        runs = list(torch.tensor_split(positions, breaks.tolist()))
        for run in runs:
            if run.numel() != self.latents:
                raise AdapterError(f"{self.model_type}: a run of {run.numel()} image tokens; each view has "
                                   f"{self.latents} latents")  # fmt: skip
        per = self.views_per_image
        if len(runs) % per:
            raise AdapterError(f"{self.model_type}: {len(runs)} views of {self.latents} latents is not a whole "
                               f"number of images of {per} views")  # fmt: skip
        return [runs[i : i + per] for i in range(0, len(runs), per)]

    def _row_plans(self, inputs: Mapping[str, Any], row: int) -> list[ImagePlan]:
        plans = []
        for views in self._views(self._input_ids(inputs)[row]):
            names = [f"crop_{i + 1}" for i in range(len(views) - 1)] + ["image"]
            plans.append(ImagePlan(tuple(GridPlan(name, 1, self.latents, None) for name in names)))
        return plans

    def _marker_ids(self, inputs: Mapping[str, Any], row: int) -> set[int]:
        return {self.fake_token_id} if self.fake_token_id is not None else set()
