"""Fuyu: patches as tokens, no vision tower.

The processor resizes the image to fit its ``size`` (never up), pads it to that size, then cuts it
back to whole patches (the last row and column of patches may hold padding), and writes one image
token per patch, each row of patches ended by a newline *text* token, then BOS and the question.
The model flattens every patch (``pixel_values``: one row of ``patch * patch * channels`` values per
patch, all images of the batch stacked) and projects it with one linear layer
(``vision_embed_tokens``) onto the image tokens, in order.

So each image is one ``rows x cols`` grid, read off the sequence (runs of image tokens, each ended
by a newline), every patch feeds exactly its own cell, and the newline tokens are the image's
markers. There are no vision blocks: explainers that read vision attention or vision-block
activations refuse (:attr:`FuyuAdapter.lacks_vision_attention`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import AdapterError
from ..layout import Region
from . import pixels as px
from .base import GridPlan, ImagePlan, ModelAdapter, _tensor, register_adapter


def _patchify_tensors(image_processor: Any) -> None:
    """Let the PIL image processor cut the tensors FuyuProcessor hands it (transformers 5.25 asks it
    for torch tensors, then its NumPy ``patchify_image`` fails on them), so an image is explained
    without torchvision. Only that one instance is wrapped; other inputs pass through unchanged."""
    from transformers import FuyuImageProcessorPil

    if not isinstance(image_processor, FuyuImageProcessorPil) or getattr(image_processor, "_xmllm_patchify", False):
        return
    original = image_processor.patchify_image

    def patchify_image(image: Any, patch_size: Any = None) -> Any:
        if not isinstance(image, torch.Tensor):
            return original(image, patch_size=patch_size)
        patches = original(np.asarray(image.detach().cpu()), patch_size=patch_size)
        return torch.from_numpy(np.ascontiguousarray(patches)).to(image.device)

    image_processor.patchify_image = patchify_image
    image_processor._xmllm_patchify = True


def _hw(size: Any) -> tuple[int | None, int | None]:
    """``(height, width)`` of a processor's size or patch size (a dict or a SizeDict)."""
    get = size.get if isinstance(size, Mapping) else lambda key: getattr(size, key, None)
    height, width = get("height"), get("width")
    return (int(height) if height else None, int(width) if width else None)


@register_adapter
class FuyuAdapter(ModelAdapter):
    """Fuyu: one grid of linearly projected patches per image, rows ended by newline tokens."""

    model_types = ("fuyu",)
    family = "Fuyu"

    # The patch projection stands in for both: it is all the "vision" the model has.
    vision_tower_path = "model.vision_embed_tokens"
    projector_path = "model.vision_embed_tokens"
    # Persimmon's decoder: attention output `dense`, MLP `dense_h_to_4h` -> act -> `dense_4h_to_h`.
    decoder_attn_out_attr = "dense"
    decoder_mlp_act_attr = "act"
    decoder_mlp_down_attr = "dense_4h_to_h"
    final_norm_attr = "final_layernorm"

    lacks_vision_attention: ClassVar[str | None] = (
        "it has no vision tower: each image patch is flattened and linearly projected (vision_embed_tokens) "
        "into the decoder's sequence, so there are no vision blocks or vision attention to read"
    )
    lacks_vision_blocks: ClassVar[str | None] = lacks_vision_attention

    def __init__(self, model: nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        _patchify_tensors(getattr(processor, "image_processor", None))

    # --- facts ----------------------------------------------------------------------------------

    @property
    def patch_size(self) -> int:
        return int(self.config.patch_size)

    @property
    def image_newline_id(self) -> int:
        token_id = getattr(self.processor, "image_newline_id", None)
        if token_id is None:
            token = getattr(self.processor, "image_newline_token", None)
            token_id = self.tokenizer.convert_tokens_to_ids(token) if token else None
        if token_id is None:
            raise AdapterError(f"{self.model_type}: the processor names no image newline token")
        return int(token_id)

    def vision_layers(self) -> nn.ModuleList:
        """None: the patches reach the decoder through one linear layer."""
        return nn.ModuleList()

    # --- plans: read off the sequence ----------------------------------------------------------------

    def _row_plans(self, inputs: Mapping[str, Any], row: int) -> list[ImagePlan]:
        """Each image's grid in row ``row``: a run of image tokens per patch row, each run ended by a
        newline token; the next image starts after a token that is neither."""
        ids = self._input_ids(inputs)[row].tolist()
        image, newline = self.image_token_id, self.image_newline_id
        self._check_patches(inputs)
        plans: list[ImagePlan] = []
        runs: list[int] = []
        i = 0
        while i < len(ids):
            if ids[i] != image:
                if runs:  # a run not continued by another: the image ended
                    plans.append(self._plan(runs, row))
                    runs = []
                i += 1
                continue
            start = i
            while i < len(ids) and ids[i] == image:
                i += 1
            if i >= len(ids) or ids[i] != newline:
                raise AdapterError(
                    f"{self.model_type}: row {row} has a run of {i - start} image tokens at position {start} "
                    "not ended by the image newline token"
                )
            runs.append(i - start)
            i += 1  # the newline
        if runs:
            plans.append(self._plan(runs, row))
        return plans

    def _plan(self, runs: list[int], row: int) -> ImagePlan:
        if len(set(runs)) != 1:
            raise AdapterError(f"{self.model_type}: an image of row {row} has patch rows of unequal lengths {runs}")
        return ImagePlan((GridPlan("image", len(runs), runs[0], region=None),))

    def _check_patches(self, inputs: Mapping[str, Any]) -> None:
        """The sequence's image tokens are the patches in ``pixel_values``, each the size the model's
        projection takes: the model's own feature count."""
        pixels = _tensor(inputs, "pixel_values")
        if pixels is None:
            return
        tokens = int((self._input_ids(inputs) == self.image_token_id).sum())
        patches = int(pixels.shape[:-1].numel())
        if tokens != patches:
            raise AdapterError(f"{self.model_type}: {tokens} image tokens but pixel_values holds {patches} patches")
        width = self.projector.in_features
        if pixels.shape[-1] != width:
            raise AdapterError(
                f"{self.model_type}: patches of {pixels.shape[-1]} values but vision_embed_tokens takes {width} "
                "(the processor's patch size is not the model's)"
            )

    def _marker_ids(self, inputs: Mapping[str, Any], row: int) -> set[int]:
        """The newline tokens that end each row of patches: text tokens, not features, no pixels."""
        return {self.image_newline_id}

    def _grid_region(self, grid: GridPlan, image_size: tuple[int, int]) -> Region | None:
        """The part of the original image the grid covers: from the top left, past the bottom and
        right edges where the processor's padding fills the last patches."""
        image_processor = getattr(self.processor, "image_processor", None)
        patch_h, patch_w = _hw(getattr(image_processor, "patch_size", None))
        if not (patch_h and patch_w):
            return None
        height, width = image_size
        target_h, target_w = _hw(getattr(image_processor, "size", None))
        fits = not (target_h and target_w) or (height <= target_h and width <= target_w)
        if getattr(image_processor, "do_resize", True) and not fits:  # fit inside the size, never upscale
            scale = min(target_h / height, target_w / width)
            height, width = int(height * scale), int(width * scale)
        if (-(-height // patch_h), -(-width // patch_w)) != (grid.rows, grid.cols):
            return None  # not the cut this processor makes of an image this size
        return (0.0, 0.0, grid.rows * patch_h / height, grid.cols * patch_w / width)

    # --- pixels -------------------------------------------------------------------------------

    def _patch_positions(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """For every patch of ``pixel_values`` (batch order, row-major in each image), the position
        of the image token it feeds."""
        positions = [grid.positions for layout in px.flat_layouts(self, inputs) for grid in layout.grids]
        return torch.cat(positions) if positions else torch.empty(0, dtype=torch.long)

    def pixel_cell_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Every value of a patch maps to that patch's cell (padding inside a patch included: the
        projection reads it)."""
        values = px.check_pixels(_tensor(inputs, "pixel_values"), (2, 3), self.model_type)
        patches = self._patch_positions(inputs)
        if patches.numel() != values.shape[:-1].numel():
            raise AdapterError(
                f"{self.model_type}: {values.shape[:-1].numel()} patches but {patches.numel()} grid cells"
            )
        cells = patches.view(*values.shape[:-1], 1).to(inputs["pixel_values"].device)
        return cells.expand(values.shape)

    def vision_token_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """One token per patch enters the projection: ``(patches,)`` positions, as it sees them."""
        values = px.check_pixels(_tensor(inputs, "pixel_values"), (2, 3), self.model_type)
        return self._patch_positions(inputs).view(values.shape[:-1]).to(inputs["pixel_values"].device)

    # --- inputs -------------------------------------------------------------------------------

    def _process(self, images: list[Any], question: str) -> Any:
        """The processor writes the image placeholder before the text itself (and the begin-of-answer
        token after it), one image per prompt; it takes no chat template."""
        if len(images) > 1:
            raise AdapterError(
                f"{self.model_type}: the processor takes one image per prompt (it writes one image placeholder "
                f"before the text), not {len(images)}"
            )
        return self.processor(text=question, images=images or None, return_tensors="pt",
                              return_legacy_image_output=False)  # fmt: skip
