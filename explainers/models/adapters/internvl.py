"""Tiled families on GotOcr2's image processor (InternVL, Aya Vision): an image is resized onto
a canvas of ``cols x rows`` tiles of the vision encoder's size (the canvas whose aspect ratio is
closest to the image's, within the processor's min/max tiles), cut into those tiles row-major,
and, when there is more than one tile, followed by a thumbnail of the whole image. Each crop's
patch grid is pixel-shuffled ``merge x merge`` into a square of decoder tokens, row-major.

``pixel_values`` stacks every crop of every image ``(crops, C, H, W)``; how many crops belong to
each image is read off the sequence (each image's tokens follow its begin-of-image token), and
the canvas of each image from its original size through the processor's own tiling rule.
Everything between an image's first and last feature token that is not a feature (Aya's tile
names) is a marker, as are the begin/end tokens around it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import AdapterError
from ..layout import FULL_IMAGE, ImageLayout, Region
from . import pixels as px
from .base import GridPlan, ImagePlan, ModelAdapter, _tensor, register_adapter

GLOBAL = "global"
"""The thumbnail's grid (the whole image at one tile's size), after the tiles."""


def _side(value: Any) -> int:
    """A vision config's size field (an int, or a (height, width) pair of equal sides)."""
    if isinstance(value, (list, tuple)):
        if len(set(int(v) for v in value)) != 1:
            raise AdapterError(f"non-square size {list(value)}: tiles are square crops")
        return int(value[0])
    return int(value)


class TiledAdapter(ModelAdapter):
    """Grids ``tile_{k}`` (1-based, the processor's row-major order) then ``global``; an image
    that fits one tile is one grid ``image``."""

    start_token_attrs: tuple[str, ...] = ()
    """Processor attributes naming the token that opens an image (an id or a token string)."""
    end_token_attrs: tuple[str, ...] = ()

    # --- what the config and processor say ---------------------------------------------------------

    def _merge(self) -> int:
        """Patches per side fused into one decoder token."""
        raise NotImplementedError

    @property
    def patch_size(self) -> int:
        return _side(self.config.vision_config.patch_size)

    def _tile_side(self) -> int:
        """Decoder tokens per side of one crop."""
        patches = _side(self.config.vision_config.image_size) // self.patch_size
        merge = self._merge()
        if patches % merge:
            raise AdapterError(f"{self.model_type}: {patches} patches per side do not merge by {merge}")
        return patches // merge

    def _token_id(self, attrs: Sequence[str]) -> int | None:
        for name in attrs:
            value = getattr(self.processor, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                token_id = self.tokenizer.convert_tokens_to_ids(value)
                if isinstance(token_id, int) and token_id != getattr(self.tokenizer, "unk_token_id", None):
                    return token_id
        return None

    def _marker_ids(self, inputs: Mapping[str, Any], row: int) -> set[int]:
        ids = (self._token_id(self.start_token_attrs), self._token_id(self.end_token_attrs))
        return {i for i in ids if i is not None and i != self.image_token_id}

    # --- plans --------------------------------------------------------------------------------------

    def _crops_per_image(self, inputs: Mapping[str, Any], row: int) -> list[int]:
        """Crops of each image of batch row ``row``: its feature tokens over one crop's."""
        ids = self._input_ids(inputs)[row]
        is_image = ids == self.image_token_id
        if not bool(is_image.any()):
            return []
        start = self._token_id(self.start_token_attrs)
        if start is None:
            raise AdapterError(f"{self.model_type}: the processor names no begin-of-image token to split images by")
        starts = torch.nonzero(ids == start).flatten().tolist()
        bounds = [*starts, ids.numel()]
        per_crop = self._tile_side() ** 2
        counts = [int(is_image[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        if int(is_image[: bounds[0]].sum()) or any(c % per_crop for c in counts):
            raise AdapterError(
                f"{self.model_type}: image tokens of row {row} are not whole crops of {per_crop} after each "
                "begin-of-image token"
            )
        return [c // per_crop for c in counts if c]

    def _check_crops(self, inputs: Mapping[str, Any]) -> None:
        """The crops the sequence's image tokens account for must be the crops in pixel_values."""
        px.check_crop_count(self, inputs, lambda row: sum(self._crops_per_image(inputs, row)), self._tile_side() ** 2,
                            "the processor writes another number of tokens per crop than the vision config gives")

    def _row_plans(self, inputs: Mapping[str, Any], row: int) -> list[ImagePlan]:
        self._check_crops(inputs)
        side = self._tile_side()
        plans = []
        for crops in self._crops_per_image(inputs, row):
            if crops == 1:
                plans.append(ImagePlan((GridPlan("image", side, side),)))
            else:
                tiles = tuple(GridPlan(f"tile_{k}", side, side, None) for k in range(1, crops))
                plans.append(ImagePlan((*tiles, GridPlan(GLOBAL, side, side))))
        return plans

    def _batch_plans(self, inputs: Mapping[str, Any]) -> list[ImagePlan]:
        rows = self._input_ids(inputs).shape[0]
        return [plan for row in range(rows) for plan in self._row_plans(inputs, row)]

    def _canvas(self, image_size: tuple[int, int]) -> tuple[int, int] | None:
        """(cols, rows) of tiles the processor cuts an image of ``image_size`` (height, width) into."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        image_processor = getattr(self.processor, "image_processor", None)
        size = getattr(image_processor, "size", None)
        height = size.get("height") if isinstance(size, Mapping) else getattr(size, "height", None)
        width = size.get("width") if isinstance(size, Mapping) else getattr(size, "width", None)
        low, high = getattr(image_processor, "min_patches", None), getattr(image_processor, "max_patches", None)
        if not (height and width and low and high):
            return None
        cols, rows = get_optimal_tiled_canvas(tuple(image_size), (int(height), int(width)), int(low), int(high))
        return int(cols), int(rows)

    def _grid_region(self, grid: GridPlan, image_size: tuple[int, int]) -> Region | None:
        if not grid.name.startswith("tile_"):
            return FULL_IMAGE  # the whole image resized to one tile
        canvas = self._canvas(image_size)
        index = int(grid.name.removeprefix("tile_")) - 1
        if canvas is None or index >= canvas[0] * canvas[1]:
            return None
        cols, rows = canvas
        row, col = divmod(index, cols)
        return (row / rows, col / cols, (row + 1) / rows, (col + 1) / cols)

    def image_layouts(self, inputs: Mapping[str, Any], row: int = 0, **kwargs: Any) -> list[ImageLayout]:
        """As the base lays them out, every non-feature token inside an image's span a marker too."""
        layouts = super().image_layouts(inputs, row, **kwargs)
        ids = self._input_ids(inputs)[row]
        starts = [i for i in (self._token_id(self.start_token_attrs),) if i is not None]
        ends = [i for i in (self._token_id(self.end_token_attrs),) if i is not None]
        start_at = torch.nonzero(torch.isin(ids, torch.tensor(starts, dtype=ids.dtype))).flatten().tolist()
        end_at = torch.nonzero(torch.isin(ids, torch.tensor(ends, dtype=ids.dtype))).flatten().tolist()
        out = []
        for layout in layouts:
            positions = layout.all_positions
            if positions.numel() == 0:
                out.append(layout)
                continue
            first, last = int(positions[0]), int(positions[-1])
            # from the image's begin token to its end token, where the processor writes them
            first = max((p for p in start_at if p <= first), default=first)
            last = min((p for p in end_at if p >= last), default=last)
            span = torch.arange(first, last + 1)
            inside = span[ids[span] != self.image_token_id]
            markers = torch.unique(torch.cat([layout.marker_positions, inside]))
            out.append(ImageLayout(layout.image_index, layout.grids, layout.extra_positions, markers))
        return out

    # --- pixels ------------------------------------------------------------------------------------

    def pixel_cell_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Crop ``i`` of ``pixel_values`` feeds the ``i``-th grid in batch order (each image's
        tiles, then its thumbnail); each ``patch x merge`` square maps to its token."""
        values = px.check_pixels(_tensor(inputs, "pixel_values"), (4,), self.model_type)
        grids = [grid for layout in px.flat_layouts(self, inputs) for grid in layout.grids]
        if len(grids) != values.shape[0]:
            raise AdapterError(f"{self.model_type}: {values.shape[0]} crops in pixel_values, {len(grids)} grids")
        cell = self.patch_size * self._merge()
        height, width = values.shape[-2:]
        maps = [px.block_map(height, width, px.grid_cells(grid), cell, cell) for grid in grids]
        return px.expand_channels(torch.stack(maps).to(values.device), values.shape, (1,))


@register_adapter
class InternVLAdapter(TiledAdapter):
    """InternVL: ``downsample_ratio`` (0.5: 2 x 2 patches a token), tiles between ``<img>`` and ``</img>``."""

    model_types = ("internvl",)
    family = "InternVL"

    vision_layers_candidates = ("encoder.layer",)
    vision_attn_candidates = ("attention",)
    start_token_attrs = ("start_image_token_id", "start_image_token")
    end_token_attrs = ("end_image_token_id", "end_image_token")

    def _merge(self) -> int:
        ratio = float(self.config.downsample_ratio)
        merge = round(1 / ratio)
        if ratio <= 0 or abs(merge * ratio - 1) > 1e-6:
            raise AdapterError(f"{self.model_type}: downsample_ratio {ratio} is not 1 / a whole number")
        return merge

    def vision_extra_tokens(self) -> int:
        """The class token(s) the embeddings put before each crop's patches."""
        cls_token = getattr(self._first_child(self.vision_tower, ("embeddings",), "vision embeddings"), "cls_token", None)
        return int(cls_token.shape[1]) if isinstance(cls_token, torch.Tensor) else 0


@register_adapter
class AyaVisionAdapter(TiledAdapter):
    """Aya Vision: ``downsample_factor`` patches a side per token; tiles named ``TILE_k`` and
    ``TILE_GLOBAL`` between ``<|START_OF_IMG|>`` and ``<|END_OF_IMG|>``; Cohere2's scaled logits."""

    model_types = ("aya_vision",)
    family = "Aya Vision"

    start_token_attrs = ("start_of_img_token",)
    end_token_attrs = ("end_of_img_token",)

    def _merge(self) -> int:
        return int(self.config.downsample_factor)

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Cohere's head multiplies the logits by the text config's ``logit_scale``, as the forward does."""
        logits = super().unembed(hidden)
        scale = getattr(self.config.get_text_config(), "logit_scale", None)
        return logits * float(scale) if scale is not None else logits


def crop_patch_map(adapter: ModelAdapter, inputs: Mapping[str, Any]) -> torch.Tensor:
    """``(crops, rows, cols)``: each crop's patch grid, for encoders whose blocks keep it (SAM-style
    necks): the position each patch's pixels feed, from the adapter's pixel map."""
    cells = adapter.pixel_cell_map(inputs)[:, 0]
    patch = adapter.patch_size
    rows, cols = cells.shape[-2] // patch, cells.shape[-1] // patch
    return px.patch_map(cells, patch).view(cells.shape[0], rows, cols)


def _conv_chain(modules: Sequence[torch.nn.Module]) -> list[torch.nn.Conv2d]:
    return [m for module in modules for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


@register_adapter
class GotOcr2Adapter(TiledAdapter):
    """GOT-OCR 2: GotOcr2's tiles (with ``crop_to_patches``) between ``<img>`` and ``</img>``;
    a SAM-style encoder whose blocks keep the patch grid ``(crops, rows, cols, hidden)``, then a
    convolutional neck and projector whose strides fuse ``merge x merge`` patches into a token.

    The convolutions' kernels reach past their stride, so a token sees its neighbours' patches
    too: cells are the stride-aligned blocks, and the family lacks ``pixel_cells``.
    """

    model_types = ("got_ocr2",)
    family = "GOT-OCR 2"

    vision_layers_candidates = ("layers",)
    vision_attn_candidates = ("attn",)
    start_token_attrs = ("img_start_token",)
    end_token_attrs = ("img_end_token",)

    @staticmethod
    def _conv_geometry(config: Any) -> tuple[int, int]:
        """(merge, field): patches per side fused into one token (the product of the neck's and
        projector's strides) and patches per side one token sees (their receptive field), read off
        the modules a model of ``config`` builds (on the meta device: no weights)."""
        from transformers.models.got_ocr2.modeling_got_ocr2 import GotOcr2MultiModalProjector, GotOcr2VisionNeck

        with torch.device("meta"):
            convs = _conv_chain([GotOcr2VisionNeck(config.vision_config), GotOcr2MultiModalProjector(config)])
        merge, field = 1, 1
        for conv in convs:
            (stride, other), kernel = tuple(conv.stride), int(conv.kernel_size[0])
            if stride != other:
                raise AdapterError(f"got_ocr2: a convolution of stride {(stride, other)} is not square")
            field += (kernel - 1) * merge
            merge *= int(stride)
        return merge, field

    def _merge(self) -> int:
        if not hasattr(self, "_geometry"):
            self._geometry = self._conv_geometry(self.config)
        return self._geometry[0]

    @classmethod
    def lacks_for_config(cls, config: Any, capability: str) -> str | None:
        if capability == "pixel_cells":
            merge, field = cls._conv_geometry(config)
            if field > merge:
                return (f"each decoder token sees {field} x {field} patches through the vision neck's and "
                        f"projector's convolutions but its cell is {merge} x {merge}, so a cell's pixels also reach "
                        "its neighbours' tokens")
        return super().lacks_for_config(config, capability)

    def vision_token_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(crops, rows, cols)``: the encoder's blocks keep each crop's patch grid."""
        return crop_patch_map(self, inputs)
