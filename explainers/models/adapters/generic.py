"""The adapter of a family with none of its own: everything derived, then checked.

Image-token positions come from the config's image token id (or, where the config class declares
one but leaves it unset, the processor's); each image's grid from the processor's outputs
(``image_grid_thw``, NaViT-packed patches sized by ``target_sizes``, or the shape of
``pixel_values``) and the vision config (patch size, merge / pixel-shuffle / pooling factor).
Before a layout is trusted, its token count is checked against the features the model itself
computes for those pixels. What cannot be derived is refused in one line naming the model type and
the missing piece; being unknown is no refusal.

Which families it serves (those transformers maps whose config names an image token and whose
image features enter the decoder's sequence) is decided by :func:`generic_refusal`.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import AdapterError
from . import pixels as px
from .base import IMAGE_SIZES_ATTR, ExtraPlan, GridPlan, ImagePlan, ModelAdapter, _tensor, register_fallback
from .thw import thw_patch_positions, thw_pixel_cell_map, thw_plans

VISION_TOWERS = ("model.vision_tower", "model.visual", "model.vision_model", "model.vision_encoder",
                 "model.vision", "vision_tower", "vision_model")  # fmt: skip
PROJECTORS = ("model.multi_modal_projector", "model.visual.merger", "model.connector", "model.mlp1",
              "model.aligner", "model.projector", "model.vision_projection", "model.embed_vision",
              "multi_modal_projector", "model.merger")  # fmt: skip
LANGUAGE_MODELS = ("model.language_model", "model.text_model", "language_model", "model")
IMAGE_TOKEN_FIELDS = ("image_token_id", "image_token_index")
"""Config fields that name the image token, in the order they are read."""
# Config fields that name how many patches per side fuse into one decoder token.
MERGE_FIELDS = ("spatial_merge_size", "merge_size", "scale_factor", "downsample_factor", "pooling_kernel_size")


def generic_refusal(config: Any) -> str | None:
    """Why the generic adapter cannot serve a model of ``config``, or None.

    Decided from the config alone, so ``xmllm models`` can say it without building the model. A
    config class that declares ``image_token_id`` (or ``image_token_index``) but leaves it None is
    no refusal: the checkpoint's config or the processor names it (checked when the adapter is built).
    """
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder: the image enters an encoder, not the decoder's sequence"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "cross_attention_layers", None):
        return ("the image enters the decoder through cross-attention layers, not its sequence, in a layout of "
                "the family's own, and this family has no adapter that reads it (Mllama's has one)")
    if getattr(config, "vq_config", None) is not None:
        return ("early fusion: a VQ tokenizer turns the image into vocabulary tokens in a layout of the family's "
                "own, and this family has no adapter that reads it (Chameleon's has one)")
    if getattr(config, "qformer_config", None) is not None:
        return "a Q-Former resamples the image into learned queries that map to no image region"
    named = any(getattr(config, name, None) is not None for name in IMAGE_TOKEN_FIELDS)
    if not named and not any(hasattr(type(config), name) for name in IMAGE_TOKEN_FIELDS):
        return "its config names no image token id, so image features have no positions in the sequence"
    if getattr(config, "vision_config", None) is None:
        return "its config has no vision_config to derive the patch grid from"
    return None


PACKED_COPIES_HOOK = "_xmllm_packs_stacked_copies"


def _pack_stacked_copies(model: nn.Module) -> None:
    """Where the base model reads NaViT-packed pixels (``(1, C, P, patches * P)`` sized by
    ``target_sizes``, MiniCPM-V), let a batch of copies stacked on dim 0 (how every explainer batches
    perturbed pixels) reach it packed along the patch axis, as the model packs a clip's frames itself;
    it would otherwise read only the first copy. One pre-hook, registered once; a batch of one passes
    unchanged."""
    base = getattr(model, "model", None)
    if not isinstance(base, nn.Module) or getattr(base, PACKED_COPIES_HOOK, False):
        return
    try:
        takes_sizes = "target_sizes" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        takes_sizes = False
    if not takes_sizes:
        return

    def pack(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        pixels = kwargs.get("pixel_values")
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[0] == 1:
            return None
        kwargs["pixel_values"] = pixels.permute(1, 2, 0, 3).reshape(1, pixels.shape[1], pixels.shape[2], -1)
        return args, kwargs

    base.register_forward_pre_hook(pack, with_kwargs=True)
    setattr(base, PACKED_COPIES_HOOK, True)


def _merge_factor(config: Any, processor: Any) -> int | None:
    """Patches per side fused into one decoder token, as the config (or processor) declares it."""
    vision = getattr(config, "vision_config", None)
    image_processor = getattr(processor, "image_processor", None)
    for owner in (vision, config, image_processor):
        for name in MERGE_FIELDS:
            value = getattr(owner, name, None)
            if isinstance(value, int) and value >= 1:
                return value
    ratio = getattr(config, "downsample_ratio", None)  # InternVL: 0.5 -> 2 x 2 patches per token
    if isinstance(ratio, float) and 0 < ratio < 1 and float(round(1 / ratio)) == 1 / ratio:
        return int(round(1 / ratio))
    return None


@register_fallback
class GenericAdapter(ModelAdapter):
    """Derives the plan of every image from the inputs and the vision config; checks the count."""

    family: ClassVar[str] = "generic"
    kind: ClassVar[str] = "generic"
    image_token_fields: ClassVar[tuple[str, ...]] = IMAGE_TOKEN_FIELDS

    @staticmethod
    def refusal(config: Any) -> str | None:
        return generic_refusal(config)

    def __init__(self, model: nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        why = generic_refusal(self.config)
        if why is not None:
            raise AdapterError(f"{self.model_type}: {why}")
        self.image_token_id  # the config's or the processor's: refused here, in one line, when neither names one
        self._checked: dict[tuple, int] = {}
        _pack_stacked_copies(model)

    # --- modules: the first known path that exists ----------------------------------------------

    def _first_path(self, candidates: tuple[str, ...], what: str) -> nn.Module:
        for path in candidates:
            try:
                return self.model.get_submodule(path)
            except AttributeError:
                continue
        raise AdapterError(
            f"{self.model_type}: cannot find the {what} of {type(self.model).__name__} (tried {', '.join(candidates)})"
        )

    @property
    def vision_tower(self) -> nn.Module:
        return self._first_path(VISION_TOWERS, "vision tower")

    @property
    def projector(self) -> nn.Module:
        return self._first_path(PROJECTORS, "projector")

    @property
    def language_model(self) -> nn.Module:
        for path in LANGUAGE_MODELS:
            try:
                module = self.model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(getattr(module, self.decoder_layers_attr, None), nn.ModuleList):
                return module
        raise AdapterError(f"{self.model_type}: cannot find the decoder stack (tried {', '.join(LANGUAGE_MODELS)})")

    # --- plans ------------------------------------------------------------------------------------

    def _merge(self) -> int | None:
        return _merge_factor(self.config, self.processor)

    def _batch_plans(self, inputs: Mapping[str, Any]) -> list[ImagePlan]:
        pixels = _tensor(inputs, "pixel_values")
        if _tensor(inputs, "image_grid_thw") is not None:
            merge = self._merge()
            if merge is None:
                raise AdapterError(f"{self.model_type}: image_grid_thw given but no merge size in the config")
            plans = thw_plans(self, inputs, merge)
        elif pixels is None:
            return []
        elif _tensor(inputs, "target_sizes") is not None:
            plans = [ImagePlan((GridPlan("image", rows, cols),)) for rows, cols, _, _ in self._packed_views(inputs)]
        elif pixels.dim() == 4:
            plans = self._view_plans(inputs, pixels)
        else:
            raise AdapterError(
                f"{self.model_type}: cannot derive the image grid from pixel_values of shape {tuple(pixels.shape)} "
                "(the generic adapter reads one vision input per image, or image_grid_thw); this family needs "
                "an adapter of its own"
            )
        self._check_features(inputs, plans)
        return plans

    def _view_plans(self, inputs: Mapping[str, Any], pixels: torch.Tensor) -> list[ImagePlan]:
        """One ``(N, C, H, W)`` vision input per image: its patch grid, fused by the merge factor."""
        total = int((self._input_ids(inputs) == self.image_token_id).sum())
        views = pixels.shape[0]
        per_view, remainder = divmod(total, views)
        patch = self.patch_size
        prows, pcols = pixels.shape[-2] // patch, pixels.shape[-1] // patch
        if remainder == 0:
            for factor in self._factors(prows, pcols, per_view):
                rows, cols = prows // factor, pcols // factor
                extra = per_view - rows * cols
                parts: tuple[GridPlan | ExtraPlan, ...] = (GridPlan("image", rows, cols),)
                if extra == 1:
                    parts = (ExtraPlan("class_token", 1), *parts)
                return [ImagePlan(parts) for _ in range(views)]
        raise AdapterError(
            f"{self.model_type}: cannot derive the image grid: {total} image tokens for {views} vision input(s) of "
            f"{prows}x{pcols} patches (patch size {patch}) fit no merge factor"
        )

    def _packed_views(self, inputs: Mapping[str, Any]) -> list[tuple[int, int, int, int]]:
        """NaViT-packed ``pixel_values`` ``(1, C, P, patches * P)``, one ``(h, w)`` patch grid per view in
        ``target_sizes`` (MiniCPM-V), one view per image: per view ``(rows, cols, h, w)``, the merged
        grid and the patch grid, ``h x w`` patches fusing into ``rows x cols`` tokens by one factor."""
        pixels, sizes = _tensor(inputs, "pixel_values"), [tuple(map(int, s)) for s in _tensor(inputs, "target_sizes")]
        patch, patches = self.patch_size, sum(h * w for h, w in sizes)
        if pixels.dim() != 4 or pixels.shape[0] != 1 or pixels.shape[-2:] != (patch, patch * patches):
            raise AdapterError(f"{self.model_type}: pixel_values of shape {tuple(pixels.shape)} are not NaViT-packed "
                               f"patches of the target_sizes {sizes} (patch size {patch})")  # fmt: skip
        noted = getattr(inputs, IMAGE_SIZES_ATTR, None)
        if noted is not None and self._input_ids(inputs).shape[0] == 1 and len(noted) != len(sizes):
            raise AdapterError(f"{self.model_type}: {len(sizes)} packed views for {len(noted)} image(s): the processor "
                               "slices images into views the generic adapter cannot group (set \"slice_mode\": false in the "
                               "checkpoint's preprocessor_config.json)")  # fmt: skip
        total = int((self._input_ids(inputs) == self.image_token_id).sum())
        factor = math.isqrt(patches // total) if total and patches % total == 0 else 0
        if not factor or factor * factor * total != patches or any(h % factor or w % factor for h, w in sizes):
            raise AdapterError(f"{self.model_type}: cannot derive the image grid: {total} image tokens for the packed "
                               f"patch grids {sizes} fit no merge factor")  # fmt: skip
        return [(h // factor, w // factor, h, w) for h, w in sizes]

    def _packed_map(self, inputs: Mapping[str, Any], window: int) -> torch.Tensor:
        """``(tokens,)``: per packed vision token (a ``window x window`` block of patches, row-major
        within each view), the position of the grid cell it feeds."""
        rows = []
        for layout, (grid_rows, _, h, w) in zip(px.flat_layouts(self, inputs), self._packed_views(inputs), strict=True):
            cells, factor = px.grid_cells(layout.grids[0]), h // grid_rows
            ys, xs = torch.arange(0, h, window) // factor, torch.arange(0, w, window) // factor
            rows.append(cells[ys][:, xs].reshape(-1))
        return torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)

    def _tower_window(self) -> int:
        """Patches per side a window merger inside the tower fuses before its last block (MiniCPM-V's
        ``insert_layer_id`` / ``window_kernel_size``), 1 when none does."""
        vision = self.config.vision_config
        insert, kernel = getattr(vision, "insert_layer_id", None), getattr(vision, "window_kernel_size", None)
        if isinstance(insert, int) and 0 <= insert < len(self.vision_layers()) - 1 and kernel:
            return int(kernel[0])
        return 1

    def _factors(self, prows: int, pcols: int, per_view: int) -> list[int]:
        """Merge factors that turn a ``prows x pcols`` patch grid into ``per_view`` tokens (the
        declared one first; a square pooled count otherwise)."""
        declared = self._merge()
        candidates = [declared] if declared else []
        side = math.isqrt(per_view)
        if side and side * side == per_view and prows == pcols and prows % side == 0:
            candidates.append(prows // side)
        candidates += [1, 2, 3, 4]
        fits = []
        for factor in candidates:
            if factor and factor not in fits and prows % factor == 0 and pcols % factor == 0:
                if per_view - (prows // factor) * (pcols // factor) in (0, 1):
                    fits.append(factor)
        return fits

    # --- the check against the model's own features ------------------------------------------------

    def _feature_kwargs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The inputs ``get_image_features`` takes besides the pixels, by name: the top-level model's,
        else its base model's (see :func:`image_feature_getter`); through a wrapper taking
        ``**kwargs`` (VideoLLaMA 3's top-level model) to the base model's own signature."""
        names: set[str] = set()
        owner = self.model if getattr(self.model, "get_image_features", None) is not None else self.model.model
        while owner is not None and getattr(owner, "get_image_features", None) is not None:
            params = inspect.signature(owner.get_image_features).parameters
            names |= set(params)
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                break
            owner = getattr(owner, "model", None)
        return {k: inputs[k] for k in inputs if k in names and k != "pixel_values"}

    def _check_features(self, inputs: Mapping[str, Any], plans: list[ImagePlan]) -> None:
        """The planned token count must equal the count of features the model computes."""
        pixels = inputs["pixel_values"]
        key = (tuple(pixels.shape), tuple(tuple(v.shape) for k, v in sorted(self._feature_kwargs(inputs).items())
                                          if torch.is_tensor(v)))
        planned = sum(plan.num_tokens for plan in plans)
        if key not in self._checked:
            getter = image_feature_getter(self.model)
            if getter is None:
                raise AdapterError(f"{self.model_type}: the model has no get_image_features to check the grid against")
            with torch.no_grad():
                out = getter(pixel_values=pixels.to(self.device, self.dtype), **self._feature_kwargs(inputs))
            self._checked[key] = _feature_count(out)
        if self._checked[key] != planned:
            raise AdapterError(
                f"{self.model_type}: the derived grids hold {planned} tokens but the model computes "
                f"{self._checked[key]} image features; this family needs an adapter of its own"
            )

    # --- pixels -----------------------------------------------------------------------------------

    def pixel_cell_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        if _tensor(inputs, "image_grid_thw") is not None:
            return thw_pixel_cell_map(self, inputs, self._merge() or 1)
        values = px.check_pixels(_tensor(inputs, "pixel_values"), (4,), self.model_type)
        if _tensor(inputs, "target_sizes") is not None:  # patch k holds columns k*P .. k*P+P-1 of every row
            line = self._packed_map(inputs, 1).repeat_interleave(self.patch_size).to(values.device)
            return line.expand(values.shape[-2], line.numel()).unsqueeze(0).unsqueeze(0).expand(values.shape)
        grid = px.flat_layouts(self, inputs)[0].grids[0]
        return px.single_view_map(self, inputs, self.model_type, values.shape[-2] // grid.rows)

    def vision_token_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        if _tensor(inputs, "image_grid_thw") is not None:
            values = _tensor(inputs, "pixel_values")
            rows = thw_patch_positions(self, inputs, self._merge() or 1)
            visual = self.vision_tower
            if hasattr(visual, "permute_input_for_window_attn"):  # Qwen2.5-VL-style window order
                from transformers.vision_utils import get_vision_window_index

                window_index, _ = get_vision_window_index(
                    _tensor(inputs, "image_grid_thw").cpu(), spatial_merge_size=visual.spatial_merge_size,
                    window_size=visual.window_size, patch_size=visual.patch_size)
                rows = visual.permute_input_for_window_attn(rows[:, None], window_index, seq_len=rows.numel())[:, 0]
            return rows.to(values.device)
        if _tensor(inputs, "target_sizes") is not None:  # the last block's tokens: (1, tokens)
            return self._packed_map(inputs, self._tower_window()).unsqueeze(0).to(_tensor(inputs, "pixel_values").device)
        return super().vision_token_map(inputs)


def image_feature_getter(model: nn.Module) -> Any:
    """The model's ``get_image_features``, or its base model's where the top-level model has none
    (Janus, DeepSeek-VL, dots3-note); None when neither has one."""
    getter = getattr(model, "get_image_features", None)
    if getter is None:
        getter = getattr(getattr(model, "model", None), "get_image_features", None)
    return getter


def _feature_count(output: Any) -> int:
    """Image-feature vectors in a ``get_image_features`` result (tensor, per-image list or output)."""
    for name in ("pooler_output", "image_embeds", "last_hidden_state"):
        value = getattr(output, name, None)
        if value is not None:
            output = value
            break
    if torch.is_tensor(output):
        return int(output.shape[:-1].numel())
    if isinstance(output, (list, tuple)):
        return sum(_feature_count(item) for item in output)
    raise AdapterError(f"cannot count image features in a {type(output).__name__}")
