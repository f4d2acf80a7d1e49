"""Mllama (Llama 3.2 Vision): the image reaches the decoder through cross-attention, not its sequence.

The image processor picks a tile arrangement (``rows x cols`` tiles of the tile size, at most
``max_image_tiles``; the aspect ratio id names it), resizes the image to fit that canvas keeping its
aspect ratio, pads the canvas's bottom and right, and cuts it into tiles (row-major, padded up to
``max_image_tiles`` with empty tiles the aspect-ratio mask switches off). A two-stage ViT encodes
every tile into a class token and its patches (row-major); the projector turns each into one key
and value of the decoder's cross-attention layers. The decoder's sequence holds only one
``<|image|>`` token per image.

Positions: explainers address image tokens by position, so this adapter numbers the cross-attended
vision tokens after the text (``sequence length + index along the cross-attention keys``): the
*extended* position space (:meth:`ModelAdapter.position_count`). Each image's grid is its canvas,
every cell one patch of one tile; class tokens and the empty tiles are extra tokens. Gradients,
perturbation, the causal set and Grad-CAM work through the pixel map as on any family; the
attention views, relevancy, knockout and token dropping read or cut the cross-attention
(:mod:`xmllm.explainers.cross_attention`, explainers that declare ``cross_attention_ready``); the
explainers that read the decoder's hidden states at image positions refuse with
:attr:`MllamaAdapter.lacks_image_tokens`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import AdapterError
from ..layout import ImageLayout, PatchGrid, Region
from .base import IMAGE_SIZES_ATTR, ModelAdapter, _tensor, register_adapter

CROSS_ATTENTION = (
    "the image enters the decoder through cross-attention layers, not its sequence: no decoder position holds an "
    "image token, so self-attention paths and hidden states never reach one"
)


@register_adapter
class MllamaAdapter(ModelAdapter):
    """Llama 3.2 Vision: tiles of patches, cross-attended; positions in the extended space."""

    model_types = ("mllama",)
    family = "Llama 3.2 Vision"

    vision_tower_path = "model.vision_model"
    projector_path = "model.multi_modal_projector"
    language_model_path = "model.language_model"
    image_token_fields: ClassVar[tuple[str, ...]] = ("image_token_index", "image_token_id")
    reads_image_through: ClassVar[str] = "cross_attention"
    lacks_image_tokens: ClassVar[str | None] = CROSS_ATTENTION

    @classmethod
    def lacks_for_config(cls, config: Any, capability: str) -> str | None:
        if capability == "decoder_attention":
            return CROSS_ATTENTION
        return super().lacks_for_config(config, capability)

    # --- the vision tower -----------------------------------------------------------------------------

    def vision_layers(self) -> nn.ModuleList:
        """The local stage's blocks, then the global stage's: the order a tile's tokens pass them."""
        tower = self.vision_tower
        return nn.ModuleList([*tower.transformer.layers, *tower.global_transformer.layers])

    def hook_points(self) -> dict[str, nn.Module]:
        """The base points, and ``decoder.blocks.{i}.cross_attn`` (with ``.out``, its output
        projection) for each block that attends to the image; those blocks have no ``.attn``."""
        points = super().hook_points()
        for i, block in enumerate(self.decoder_layers()):
            cross = getattr(block, "cross_attn", None)
            if isinstance(cross, nn.Module):
                points[f"decoder.blocks.{i}.cross_attn"] = cross
                points[f"decoder.blocks.{i}.cross_attn.out"] = cross.o_proj
        return points

    # --- geometry --------------------------------------------------------------------------------

    def _pixels(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        pixels = _tensor(inputs, "pixel_values")
        if pixels is None or pixels.dim() != 6:
            shape = None if pixels is None else tuple(pixels.shape)
            raise AdapterError(f"{self.model_type}: pixel_values of shape {shape}; expected "
                               "(batch, images, tiles, C, H, W)")  # fmt: skip
        return pixels

    def _tile_patches(self, pixels: torch.Tensor) -> tuple[int, int]:
        patch = self.patch_size
        rows, cols = int(pixels.shape[-2]) // patch, int(pixels.shape[-1]) // patch
        expected = getattr(self.vision_tower, "num_patches", None)
        if isinstance(expected, int) and expected != rows * cols + 1:
            raise AdapterError(f"{self.model_type}: tiles of {rows}x{cols} patches but the vision model makes "
                               f"{expected} tokens a tile (class token included)")  # fmt: skip
        return rows, cols

    def _arrangement(self, inputs: Mapping[str, Any], row: int, image: int, tiles: int) -> tuple[int, int]:
        """``(tile rows, tile cols)`` of one image, from its aspect ratio id, checked against its tile mask."""
        ids = _tensor(inputs, "aspect_ratio_ids")
        if ids is None:
            raise AdapterError(f"{self.model_type}: inputs have no aspect_ratio_ids")
        ratio = int(ids[row, image])
        # the image processor's own list, whose index (id - 1) names (tile rows, tile cols); imported here
        # so that importing the adapters stays free of transformers' modules
        from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios

        ratios = get_all_supported_aspect_ratios(tiles)
        if not 1 <= ratio <= len(ratios):
            raise AdapterError(f"{self.model_type}: aspect ratio id {ratio} of image {image} is not one of the "
                               f"{len(ratios)} arrangements of {tiles} tiles")  # fmt: skip
        arrangement = ratios[ratio - 1]
        mask = _tensor(inputs, "aspect_ratio_mask")
        if mask is not None and int(mask[row, image].sum()) != arrangement[0] * arrangement[1]:
            raise AdapterError(f"{self.model_type}: image {image} has {int(mask[row, image].sum())} tiles but its "
                               f"aspect ratio says {arrangement[0]}x{arrangement[1]}")  # fmt: skip
        return arrangement

    def position_count(self, inputs: Mapping[str, Any]) -> int:
        """The text positions, then one per cross-attended vision token of a batch row."""
        pixels = _tensor(inputs, "pixel_values")
        text = int(self._input_ids(inputs).shape[-1])
        if pixels is None:
            return text
        rows, cols = self._tile_patches(pixels)
        return text + int(pixels.shape[1]) * int(pixels.shape[2]) * (rows * cols + 1)

    def _region(self, arrangement: tuple[int, int], tile: int, image_size: tuple[int, int] | None) -> Region | None:
        """The canvas over the original image: from the top left, past the bottom and right where it is padding."""
        if image_size is None:
            return None
        canvas_h, canvas_w = arrangement[0] * tile, arrangement[1] * tile
        from transformers.models.mllama.image_processing_pil_mllama import get_image_size_fit_to_canvas

        height, width = get_image_size_fit_to_canvas(image_size[0], image_size[1], canvas_h, canvas_w, tile)
        return (0.0, 0.0, canvas_h / height, canvas_w / width)

    def image_layouts(
        self, inputs: Mapping[str, Any], row: int = 0, *, image_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[ImageLayout]:
        """Each image of row ``row``: its canvas grid over the cross-attended patch tokens, the tiles'
        class tokens and the empty tiles' tokens as extras, its ``<|image|>`` token as the marker."""
        ids = self._input_ids(inputs)[row]
        markers = torch.nonzero(ids == self.image_token_id).flatten()
        if _tensor(inputs, "pixel_values") is None:
            if markers.numel():
                raise AdapterError(f"{self.model_type}: {markers.numel()} image tokens but no pixel_values")
            return []
        pixels = self._pixels(inputs)
        images, tiles = int(pixels.shape[1]), int(pixels.shape[2])
        patch_rows, patch_cols = self._tile_patches(pixels)
        per_tile = patch_rows * patch_cols + 1
        if image_sizes is None and row == 0:
            image_sizes = getattr(inputs, IMAGE_SIZES_ATTR, None)
        used = self._used_images(inputs, row, images)
        if len(used) != markers.numel():
            raise AdapterError(f"{self.model_type}: row {row} has {markers.numel()} image tokens but "
                               f"{len(used)} images")  # fmt: skip
        base = int(ids.shape[-1])
        layouts = []
        for index in used:
            tile_rows, tile_cols = self._arrangement(inputs, row, index, tiles)
            first = base + index * tiles * per_tile
            canvas = torch.empty(tile_rows * patch_rows, tile_cols * patch_cols, dtype=torch.long)
            for tile in range(tile_rows * tile_cols):
                r, c = divmod(tile, tile_cols)
                start = first + tile * per_tile + 1  # after the tile's class token
                patches = torch.arange(start, start + patch_rows * patch_cols).view(patch_rows, patch_cols)
                canvas[r * patch_rows : (r + 1) * patch_rows, c * patch_cols : (c + 1) * patch_cols] = patches
            used_tiles = tile_rows * tile_cols
            class_tokens = first + torch.arange(used_tiles) * per_tile
            empty = torch.arange(first + used_tiles * per_tile, first + tiles * per_tile)
            size = tuple(image_sizes[len(layouts)]) if image_sizes is not None and len(image_sizes) > len(layouts) else None
            grid = PatchGrid("image", canvas.shape[0], canvas.shape[1], canvas.flatten(),
                             self._region((tile_rows, tile_cols), int(pixels.shape[-2]), size))  # fmt: skip
            extras = {"class_token": class_tokens}
            if empty.numel():
                extras["empty_tile"] = empty
            layouts.append(ImageLayout(len(layouts), (grid,), extras, markers[len(layouts) : len(layouts) + 1]))
        return layouts

    @staticmethod
    def _used_images(inputs: Mapping[str, Any], row: int, images: int) -> list[int]:
        """Indices of the row's images (batch padding has aspect ratio id 0)."""
        ids = _tensor(inputs, "aspect_ratio_ids")
        return [i for i in range(images) if ids is None or int(ids[row, i]) > 0]

    def _marker_ids(self, inputs: Mapping[str, Any], row: int) -> set[int]:
        return {self.image_token_id}

    # --- pixels -------------------------------------------------------------------------------

    def _token_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(batch, images, tiles, tokens a tile)``: each vision token's extended position (-1: an
        empty tile's), in the order the vision model writes them (class token first)."""
        pixels = self._pixels(inputs)
        batch, images, tiles = (int(n) for n in pixels.shape[:3])
        patch_rows, patch_cols = self._tile_patches(pixels)
        per_tile = patch_rows * patch_cols + 1
        out = torch.full((batch, images, tiles, per_tile), -1, dtype=torch.long)
        for row in range(batch):
            for index, layout in zip(self._used_images(inputs, row, images), self.image_layouts(inputs, row)):
                used = layout.extra_positions["class_token"].numel()
                first = int(layout.extra_positions["class_token"][0])
                out[row, index, :used] = first + torch.arange(used * per_tile).view(used, per_tile)
        return out

    def pixel_cell_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Every value of a patch maps to that patch's extended position; an empty tile's to -1."""
        pixels = self._pixels(inputs)
        patch = self.patch_size
        patch_rows, patch_cols = self._tile_patches(pixels)
        tokens = self._token_map(inputs)[..., 1:]  # the patches, without the class token
        tokens = tokens.view(*tokens.shape[:3], patch_rows, 1, patch_cols, 1)
        cells = tokens.expand(*tokens.shape[:3], patch_rows, patch, patch_cols, patch)
        cells = cells.reshape(*tokens.shape[:3], 1, patch_rows * patch, patch_cols * patch)
        height, width = int(pixels.shape[-2]), int(pixels.shape[-1])
        full = torch.full((*pixels.shape[:3], 1, height, width), -1, dtype=torch.long)
        full[..., : patch_rows * patch, : patch_cols * patch] = cells
        return full.expand(pixels.shape).to(inputs["pixel_values"].device)

    def vision_token_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(batch * images, tiles * padded tokens a tile)``, as a vision block sees them: each tile's
        class token, its patches, then the padding to a multiple of 8 (-1)."""
        tokens = self._token_map(inputs)
        pad = (8 - tokens.shape[-1] % 8) % 8
        padded = torch.cat([tokens, tokens.new_full((*tokens.shape[:-1], pad), -1)], dim=-1)
        return padded.view(tokens.shape[0] * tokens.shape[1], -1).to(inputs["pixel_values"].device)

    # --- inputs -------------------------------------------------------------------------------

    def append_tokens(self, inputs: Any, token_ids: Sequence[int]) -> tuple[Any, torch.Tensor]:
        """As the base, and the appended tokens see the images the last token sees (cross-attention mask)."""
        mask = inputs.get("cross_attention_mask") if hasattr(inputs, "get") else None
        inputs, positions = super().append_tokens(inputs, token_ids)
        if torch.is_tensor(mask) and mask.dim() == 4:
            last = mask[:, -1:].expand(mask.shape[0], len(token_ids), *mask.shape[2:])
            inputs["cross_attention_mask"] = torch.cat([mask, last], dim=1)
        return inputs, positions

    def decoder_input_sequence(self, hidden: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
        """The first decoder block's inputs in the extended space: the text's hidden states, then the
        cross-attention states (``(batch * images * tiles, tokens, hidden)`` -> one row per batch row)."""
        states = kwargs.get("cross_attention_states")
        if states is None:
            return hidden
        return torch.cat([hidden, states.reshape(hidden.shape[0], -1, states.shape[-1]).to(hidden.dtype)], dim=1)
