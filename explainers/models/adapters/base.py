"""The adapter contract: one class per model family maps a model and its processor to positions,
modules and hook points that explainers can rely on, whatever the family.

Nothing here knows a number of image tokens, a grid size or a prompt offset: a family's adapter
derives each image's plan (its grids and extra tokens, in sequence order) from the config, the
processor and the processed inputs, and the base class lays that plan over the positions where
``input_ids`` holds the image token, checking that the two agree.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import AdapterError, UnsupportedModelError
from ..layout import FULL_IMAGE, ImageLayout, PatchGrid, Region
from .pixels import patch_map, with_leading_tokens

# --- plans: what an adapter says about one image, before positions are laid over it ------------


@dataclass(frozen=True)
class GridPlan:
    """A ``rows x cols`` grid; with ``row_suffix``, one extra feature token ends every row."""

    name: str
    rows: int
    cols: int
    region: Region | None = FULL_IMAGE
    row_suffix: str | None = None

    @property
    def num_tokens(self) -> int:
        return self.rows * (self.cols + (1 if self.row_suffix else 0))


@dataclass(frozen=True)
class ExtraPlan:
    """``count`` image-feature tokens outside any grid (e.g. a class token)."""

    reason: str
    count: int

    @property
    def num_tokens(self) -> int:
        return self.count


@dataclass(frozen=True)
class ImagePlan:
    """The parts of one image, in the order the model writes its features into the sequence."""

    parts: tuple[GridPlan | ExtraPlan, ...]

    @property
    def num_tokens(self) -> int:
        return sum(p.num_tokens for p in self.parts)


IMAGE_SIZES_ATTR = "xmllm_image_sizes"
"""Attribute (not a key, so never a model input) where build_inputs notes the original
(height, width) of each image, for :meth:`ModelAdapter.image_layouts` to place cropped grids."""


CAPABILITIES: dict[str, str] = {
    "decoder_attention": "every decoder block attends over the sequence (image tokens included) with an attention matrix",
    "vision_attention": "the vision tower is a stack of attention blocks",
    "vision_blocks": "the vision tower is a stack of blocks whose outputs are the image's patch tokens",
    "pixel_cells": "each cell of an image grid maps back to the pixels that feed it",
    "mlp_neurons": "every decoder block has one dense MLP whose hidden units every token passes through",
    "image_tokens": "the image's features are positions of the decoder's sequence, read by its blocks",
}
"""What an explainer may need from a model family, with what it means; adapters say which they lack."""
def processor_image_token(processor: Any) -> int | None:
    """The processor's image token id, else its tokenizer's ``image_token`` converted to an id."""
    token = getattr(processor, "image_token_id", None)
    if token is not None:
        return token
    tokenizer = getattr(processor, "tokenizer", processor)
    for owner in (processor, tokenizer):
        name = getattr(owner, "image_token", None)
        if isinstance(name, str) and hasattr(tokenizer, "convert_tokens_to_ids"):
            token = tokenizer.convert_tokens_to_ids(name)
            if token is not None and token != getattr(tokenizer, "unk_token_id", None):
                return token
    return None


DECLARED = ("pixel_cells", "vision_attention", "vision_blocks", "image_tokens")
"""Capabilities a family's adapter declares (``lacks_<capability>``: the reason, or None) rather than
the config or the loaded model showing them."""


MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
"""Text-config fields that give a mixture-of-experts decoder's expert count."""


# --- registry ------------------------------------------------------------------------------------

_ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: serve every ``config.model_type`` in ``cls.model_types`` with ``cls``."""
    if not cls.model_types:
        raise TypeError(f"adapter {cls.__name__} declares no model_types")
    for model_type in cls.model_types:
        existing = _ADAPTERS.get(model_type)
        if existing is not None and existing is not cls:
            raise TypeError(f"model type {model_type!r} already has adapter {existing.__name__}")
        _ADAPTERS[model_type] = cls
    return cls


def registered_adapters() -> dict[str, type[ModelAdapter]]:
    return dict(sorted(_ADAPTERS.items()))


_FALLBACK: list[type[ModelAdapter]] = []


def register_fallback(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: serve model types without an adapter of their own with ``cls`` (the
    generic adapter), where its ``refusal(config)`` allows."""
    _FALLBACK[:] = [cls]
    return cls


def lookup_adapter(model_type: str | None, config: Any = None) -> type[ModelAdapter]:
    """The adapter class for ``model_type``: its own, else the generic one unless ``config`` shows
    that the generic one cannot serve it (a one-line :class:`UnsupportedModelError` naming why)."""
    if model_type in _ADAPTERS:
        return _ADAPTERS[model_type]
    if _FALLBACK:
        fallback = _FALLBACK[0]
        why = fallback.refusal(config) if config is not None else None
        if why is None:
            return fallback
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported: {why}; 'xmllm models' lists every family and its status"
        )
    raise UnsupportedModelError(
        f"no adapter for model type {model_type!r}; supported: {', '.join(sorted(_ADAPTERS))}"
    )


# --- the adapter -----------------------------------------------------------------------------------


def _tensor(inputs: Mapping[str, Any], key: str) -> torch.Tensor | None:
    value = inputs.get(key)
    return torch.as_tensor(value) if value is not None else None


class ModelAdapter:
    """Family-independent access to an image-text-to-text model and its processor.

    Subclasses set ``model_types`` and the module paths below, and implement
    :meth:`_batch_plans` (or :meth:`_row_plans` when the plan depends on the row's tokens).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = ""
    kind: ClassVar[str] = "own"
    """"own" for a family's adapter, "generic" for the one that derives everything."""

    # Dotted module paths, relative to the model (``model.get_submodule``).
    vision_tower_path: ClassVar[str] = "model.vision_tower"
    projector_path: ClassVar[str] = "model.multi_modal_projector"
    language_model_path: ClassVar[str] = "model.language_model"
    # Relative to the vision tower: the first that exists is its stack of blocks.
    vision_layers_candidates: ClassVar[tuple[str, ...]] = (
        "vision_model.encoder.layers",
        "encoder.layers",
        "blocks",
        "layers",
    )
    vision_attn_candidates: ClassVar[tuple[str, ...]] = ("self_attn", "attn")
    # Relative to the language model and its blocks.
    decoder_layers_attr: ClassVar[str] = "layers"
    decoder_attn_attr: ClassVar[str] = "self_attn"
    # Relative to a block's attention: its output projection (heads -> residual stream).
    decoder_attn_out_attr: ClassVar[str] = "o_proj"
    decoder_mlp_attr: ClassVar[str] = "mlp"
    # Relative to a block's MLP: its activation function (the gate's nonlinearity) and its output
    # projection, whose input holds the MLP's neuron values.
    decoder_mlp_act_attr: ClassVar[str] = "act_fn"
    decoder_mlp_down_attr: ClassVar[str] = "down_proj"
    final_norm_attr: ClassVar[str] = "norm"

    # Inputs aligned with input_ids, and the value appended answer tokens get in each.
    per_token_fill: ClassVar[dict[str, int]] = {
        "attention_mask": 1,
        "token_type_ids": 0,
        "mm_token_type_ids": 0,
    }
    # Processor outputs that are training conveniences, not model inputs for explaining.
    dropped_input_keys: ClassVar[tuple[str, ...]] = ("labels",)

    def __init__(self, model: nn.Module, processor: Any) -> None:
        self.model = model
        self.processor = processor

    # --- basic facts --------------------------------------------------------------------------

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def model_type(self) -> str:
        return str(self.config.model_type)

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> torch.device:
        """Where inputs go: a dispatched model's execution device (its first parameter may be on
        the meta device, offloaded), else its first parameter's."""
        if getattr(self.model, "hf_device_map", None):
            from ..dispatch import execution_device

            return execution_device(self.model)
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def image_token_id(self) -> int:
        """The placeholder id the model overwrites with image features, as the model reads it: the
        first of :attr:`image_token_fields` the config sets, else the processor's."""
        for name in self.image_token_fields:
            token_id = getattr(self.config, name, None)
            if token_id is not None:
                return int(token_id)
        token_id = processor_image_token(self.processor)
        if token_id is None:
            raise AdapterError(f"{self.model_type}: no image token id in its config or processor")
        return int(token_id)

    # --- positions ----------------------------------------------------------------------------

    def _input_ids(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``input_ids`` as a 2-D CPU tensor: positions are small index tensors, kept on the CPU."""
        ids = _tensor(inputs, "input_ids")
        if ids is None:
            raise AdapterError("inputs have no 'input_ids'")
        ids = ids.detach().cpu()
        return ids if ids.dim() == 2 else ids.unsqueeze(0)

    def _batch_plans(self, inputs: Mapping[str, Any]) -> list[ImagePlan]:
        """One plan per image of the whole batch, in batch order."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _batch_plans nor _row_plans")

    def _row_plans(self, inputs: Mapping[str, Any], row: int) -> list[ImagePlan]:
        """The plans of the images in batch row ``row``: the batch's plans, split by token counts."""
        ids = self._input_ids(inputs)
        counts = (ids == self.image_token_id).sum(dim=-1).tolist()
        plans = self._batch_plans(inputs)
        start, skip = 0, sum(counts[:row])
        while skip > 0 and start < len(plans):
            skip -= plans[start].num_tokens
            start += 1
        end, take = start, counts[row]
        while take > 0 and end < len(plans):
            take -= plans[end].num_tokens
            end += 1
        if skip != 0 or take != 0:
            raise AdapterError(
                f"{self.model_type}: the image tokens of row {row} do not line up with the images' plans "
                f"({counts[row]} tokens in the row)"
            )
        return plans[start:end]

    def _marker_ids(self, inputs: Mapping[str, Any], row: int) -> set[int]:
        """Token ids a processor puts around an image (begin/end, tile tags); none by default."""
        return set()

    def _grid_region(self, grid: GridPlan, image_size: tuple[int, int]) -> Region | None:
        """The grid's region once the original (height, width) is known; as planned by default."""
        return grid.region

    def image_layouts(
        self,
        inputs: Mapping[str, Any],
        row: int = 0,
        *,
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[ImageLayout]:
        """Each image of batch row ``row``: its grids, extra feature tokens and markers.

        ``image_sizes`` (original height, width per image of the row) places grids where the
        processor crops (LLaVA's centre crop); inputs from :meth:`build_inputs` carry them, and
        without them such regions are None.
        """
        ids = self._input_ids(inputs)[row]
        positions = torch.nonzero(ids == self.image_token_id).flatten()
        plans = self._row_plans(inputs, row)
        if image_sizes is None and row == 0:
            image_sizes = getattr(inputs, IMAGE_SIZES_ATTR, None)
        if image_sizes is not None:
            plans = [
                ImagePlan(
                    tuple(
                        replace(p, region=self._grid_region(p, tuple(size))) if isinstance(p, GridPlan) else p
                        for p in plan.parts
                    )
                )
                for plan, size in zip(plans, image_sizes, strict=False)
            ] + plans[len(image_sizes) :]
        expected = sum(plan.num_tokens for plan in plans)
        if expected != positions.numel():
            raise AdapterError(
                f"{self.model_type}: row {row} has {positions.numel()} image tokens but the config and "
                f"inputs account for {expected}"
            )
        markers = self._marker_ids(inputs, row)
        layouts, cursor = [], 0
        for index, plan in enumerate(plans):
            layout, cursor = self._lay_out(index, plan, positions, cursor)
            if markers:
                layout = ImageLayout(
                    layout.image_index,
                    layout.grids,
                    layout.extra_positions,
                    _marker_positions(ids, layout.all_positions, markers),
                )
            layouts.append(layout)
        return layouts

    @staticmethod
    def _lay_out(index: int, plan: ImagePlan, positions: torch.Tensor, cursor: int) -> tuple[ImageLayout, int]:
        grids: list[PatchGrid] = []
        extras: dict[str, list[torch.Tensor]] = {}
        for part in plan.parts:
            if isinstance(part, ExtraPlan):
                extras.setdefault(part.reason, []).append(positions[cursor : cursor + part.count])
                cursor += part.count
                continue
            if part.row_suffix is None:
                cells = positions[cursor : cursor + part.rows * part.cols]
                cursor += part.rows * part.cols
            else:
                rows = []
                for _ in range(part.rows):
                    end = cursor + part.cols
                    rows.append(positions[cursor:end])
                    extras.setdefault(part.row_suffix, []).append(positions[end : end + 1])
                    cursor = end + 1
                cells = torch.cat(rows) if rows else positions[:0]
            grids.append(PatchGrid(part.name, part.rows, part.cols, cells, part.region))
        extra = {reason: torch.cat(chunks) for reason, chunks in extras.items()}
        return ImageLayout(index, tuple(grids), extra), cursor

    def position_count(self, inputs: Mapping[str, Any]) -> int:
        """How many positions image layouts may address in one batch row: the decoder's sequence, or
        for a family that cross-attends to the image, the sequence then the cross-attended tokens."""
        return int(self._input_ids(inputs).shape[-1])

    def decoder_input_sequence(self, hidden: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
        """The first decoder block's inputs over :meth:`position_count` positions, from its hidden
        states and keyword arguments: the hidden states, for a family whose image is in the sequence."""
        return hidden

    def text_positions(
        self, inputs: Mapping[str, Any], row: int = 0, exclude: torch.Tensor | Sequence[int] | None = None
    ) -> torch.Tensor:
        """Attended positions that are neither image features nor image markers.

        Template and special tokens count as text; appended answer tokens too, unless passed in
        ``exclude`` (build_inputs returns their positions).
        """
        ids = self._input_ids(inputs)[row]
        keep = ids != self.image_token_id
        mask = _tensor(inputs, "attention_mask")
        if mask is not None:
            keep &= (mask if mask.dim() == 2 else mask.unsqueeze(0))[row].detach().cpu().to(torch.bool)
        if bool((ids == self.image_token_id).any()) and self._marker_ids(inputs, row):
            for layout in self.image_layouts(inputs, row):
                keep[layout.marker_positions] = False
        if exclude is not None:
            keep[torch.as_tensor(exclude, dtype=torch.long).cpu()] = False
        return torch.nonzero(keep).flatten()

    # --- pixels -------------------------------------------------------------------------------

    @property
    def patch_size(self) -> int:
        """Pixels per side of one vision-tower patch."""
        return int(self.config.vision_config.patch_size)

    def pixel_cell_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """For every value of ``inputs["pixel_values"]``, the position of the grid cell covering it.

        A LongTensor of the same shape as ``pixel_values`` (possibly an expanded view over the
        channel dims), on its device, holding the decoder sequence position (within the image's
        own batch row) of the image token whose grid cell covers that value, or -1 where no grid
        cell does (padding, cropped margins, pixels feeding only extra tokens). Pixel scores pool
        onto a grid by scatter-adding over positions, then ``PatchGrid.gather``; a cell is
        occluded by writing ``pixel_values`` where the map equals its position.
        """
        raise AdapterError(f"{self.model_type}: the {type(self).__name__} has no pixel-to-grid map")

    def vision_token_map(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """For the tokens a vision block sees, the decoder position each one feeds (-1: none).

        Shaped like a vision block's activations without the hidden axis (e.g. ``(images,
        tokens)``; Qwen: ``(patches,)`` in the blocks' window order), so block activations or
        gradients pool onto grids by position; the class token and padding views get -1 or are
        absent, as they are in the blocks. This default serves towers fed ``(N, C, H, W)``.
        """
        cells = self.pixel_cell_map(inputs)
        if cells.dim() != 4:
            raise AdapterError(f"{self.model_type}: no vision-token map for pixel_values of {cells.dim()} dims")
        patches = patch_map(cells[:, 0], self.patch_size)
        return with_leading_tokens(patches, self.vision_extra_tokens())

    def vision_extra_tokens(self) -> int:
        """Tokens the vision embeddings put before the patches (CLIP's class token): 0 or more."""
        for path in ("vision_model.embeddings", "embeddings"):
            try:
                embeddings = self.vision_tower.get_submodule(path)
            except AttributeError:
                continue
            positions, patches = getattr(embeddings, "num_positions", None), getattr(embeddings, "num_patches", None)
            if isinstance(positions, int) and isinstance(patches, int):
                return positions - patches
        return 0

    # --- modules ------------------------------------------------------------------------------

    def _module(self, path: str) -> nn.Module:
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            raise AdapterError(
                f"{type(self.model).__name__} has no module {path!r}; the {self.model_type} adapter expects "
                "the module layout of transformers' implementation"
            ) from None

    @staticmethod
    def _first_child(parent: nn.Module, candidates: Iterable[str], what: str) -> nn.Module:
        for path in candidates:
            try:
                return parent.get_submodule(path)
            except AttributeError:
                continue
        raise AdapterError(f"cannot find the {what} in {type(parent).__name__} (tried {', '.join(candidates)})")

    @property
    def vision_tower(self) -> nn.Module:
        return self._module(self.vision_tower_path)

    @property
    def projector(self) -> nn.Module:
        return self._module(self.projector_path)

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack's owner (embeddings, blocks, final norm), without the LM head."""
        return self._module(self.language_model_path)

    def vision_layers(self) -> nn.ModuleList:
        return self._first_child(self.vision_tower, self.vision_layers_candidates, "vision blocks")

    def decoder_layers(self) -> nn.ModuleList:
        return self._first_child(self.language_model, (self.decoder_layers_attr,), "decoder blocks")

    @property
    def final_norm(self) -> nn.Module:
        return self._first_child(self.language_model, (self.final_norm_attr,), "final norm")

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    # Text-config field of the tanh cap the family's forward puts on its logits, or None where its
    # forward applies none (PaliGemma applies Gemma 2's; Gemma 3's multimodal forward does not).
    final_logit_softcap_attr: ClassVar[str | None] = None

    def final_logit_softcap(self) -> float | None:
        """The cap ``c`` in ``logits = c * tanh(logits / c)`` the model's forward applies, or None."""
        if self.final_logit_softcap_attr is None:
            return None
        value = getattr(self.config.get_text_config(), self.final_logit_softcap_attr, None)
        return float(value) if value is not None else None

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits the model reads off residual-stream states ``hidden`` (..., hidden_size).

        Final norm, LM head and the family's logit cap, as the model's own forward applies them
        after its last block: the logit lens's read-out, exact at the last layer.
        """
        logits = self.lm_head(self.final_norm(hidden))
        cap = self.final_logit_softcap()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def hook_points(self) -> dict[str, nn.Module]:
        """Stable, family-independent names for the modules explainers hook, in forward order.

        ``decoder.blocks.{i}`` outputs the residual stream after block i; ``.attn`` and ``.mlp``
        are its self-attention and MLP modules; ``.attn.out`` is the attention's output projection
        where it has one; where the MLP has them, ``.mlp.act`` is its
        activation function (output: ``act(gate)`` per neuron) and ``.mlp.down`` its output
        projection, whose *input* holds the neuron values (``act(gate) * up`` in gated MLPs);
        ``decoder.embed`` outputs the token embeddings before image features are written in.
        """
        points: dict[str, nn.Module] = {}
        for i, block in enumerate(self.vision_layers()):
            points[f"vision.blocks.{i}"] = block
            points[f"vision.blocks.{i}.attn"] = self._first_child(block, self.vision_attn_candidates, "attention")
        points["projector"] = self.projector
        points["decoder.embed"] = self.input_embeddings
        for i, block in enumerate(self.decoder_layers()):
            points[f"decoder.blocks.{i}"] = block
            attn = getattr(block, self.decoder_attn_attr, None)
            if isinstance(attn, nn.Module):  # hybrid decoders: linear-attention blocks have none
                points[f"decoder.blocks.{i}.attn"] = attn
                out = getattr(attn, self.decoder_attn_out_attr, None)
                if isinstance(out, nn.Module):
                    points[f"decoder.blocks.{i}.attn.out"] = out
            mlp = self._first_child(block, (self.decoder_mlp_attr,), "MLP")
            points[f"decoder.blocks.{i}.mlp"] = mlp
            for suffix, attr in (("act", self.decoder_mlp_act_attr), ("down", self.decoder_mlp_down_attr)):
                part = getattr(mlp, attr, None)
                if isinstance(part, nn.Module):
                    points[f"decoder.blocks.{i}.mlp.{suffix}"] = part
        points["decoder.final_norm"] = self.final_norm
        points["lm_head"] = self.lm_head
        return points

    # --- what the family offers explainers ---------------------------------------------------------

    # Reasons a family's own adapter declares for a capability it never has (None: it has it).
    image_token_fields: ClassVar[tuple[str, ...]] = ("image_token_id",)
    """Config fields that name the image token, in the order they are read."""
    lacks_pixel_cells: ClassVar[str | None] = None
    lacks_vision_attention: ClassVar[str | None] = None
    lacks_vision_blocks: ClassVar[str | None] = None
    lacks_image_tokens: ClassVar[str | None] = None
    reads_image_through: ClassVar[str] = "sequence"
    """How the decoder reads image features: "sequence" (tokens of its sequence) or "cross_attention"
    (keys and values of cross-attention layers; positions then extend past the sequence, see
    :meth:`position_count`)."""

    @classmethod
    def lacks_for_config(cls, config: Any, capability: str) -> str | None:
        """Why a model of ``config`` served by this adapter cannot give ``capability``, or None:
        what the config and the adapter's declarations tell, before any model is built."""
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}")
        if capability in DECLARED:
            return getattr(cls, f"lacks_{capability}")
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if capability == "mlp_neurons":
            experts = [getattr(text, name, None) for name in MOE_FIELDS]
            if any(isinstance(n, int) and n > 1 for n in experts):
                return ("its decoder MLPs are mixtures of experts: a token passes through a few experts, so a "
                        "neuron is not a unit of every token's MLP")
            return None
        kinds = list(getattr(text, "layer_types", None) or [])
        mixing = [k for k in kinds if "attention" not in str(k)] + [k for k in kinds if "linear" in str(k)]
        if mixing:
            return (f"{len(mixing)} of its {len(kinds)} decoder blocks mix tokens without an attention matrix "
                    f"({sorted(set(map(str, mixing)))[0]}), so attention paths through the decoder are incomplete")
        return None

    def lacks(self, capability: str) -> str | None:
        """Why this model cannot give ``capability`` (one of :data:`CAPABILITIES`), or None.

        Explainers declare the capabilities they need (``Explainer.model_needs``); a missing one is
        a declared refusal with this reason, listed like a leaf run's skips, never a traceback.
        """
        why = self.lacks_for_config(self.config, capability)
        if why is not None:
            return why
        if capability == "decoder_attention":
            blocks = self.decoder_layers()
            without = [i for i, block in enumerate(blocks)
                       if not isinstance(getattr(block, self.decoder_attn_attr, None), nn.Module)]  # fmt: skip
            if without:
                return (f"{len(without)} of its {len(blocks)} decoder blocks mix tokens without an attention "
                        "matrix, so attention paths through the decoder are incomplete")
        if capability == "mlp_neurons":
            points = self.hook_points()
            blocks = len(self.decoder_layers())
            missing = [i for i in range(blocks) if f"decoder.blocks.{i}.mlp.down" not in points]
            if missing:
                return (f"{len(missing)} of its {blocks} decoder blocks have no dense MLP output projection "
                        "to read neurons from")
        if capability == "vision_blocks":
            try:
                blocks = len(self.vision_layers())
            except AdapterError as error:
                return f"its vision tower has no blocks to read ({error})"
            if not blocks:
                return "its vision tower has no blocks whose outputs to read"
        if capability == "vision_attention":
            try:
                for block in self.vision_layers():
                    self._first_child(block, self.vision_attn_candidates, "attention")
            except AdapterError as error:
                return f"its vision tower has no attention blocks to read ({error})"
        return None

    # --- inputs -------------------------------------------------------------------------------

    def _has_chat_template(self) -> bool:
        return bool(getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None))

    def fallback_prompt(self, num_images: int, question: str) -> str:
        """The prompt for processors without a chat template: image placeholders, then the question."""
        placeholder = getattr(self.processor, "image_token", None)
        if placeholder is None:
            raise AdapterError(f"{self.model_type}: the processor has no chat template and no image token")
        return placeholder * num_images + question

    def prompt(self, num_images: int, question: str) -> str:
        """One user turn with the images then the question, through the processor's chat template."""
        if not self._has_chat_template():
            return self.fallback_prompt(num_images, question)
        content: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": question})
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def tokenize_answer(self, answer: str) -> list[int]:
        """The answer's token ids as they would follow the prompt: no BOS or other special prefix."""
        return list(self.tokenizer(answer, add_special_tokens=False)["input_ids"])

    def append_tokens(self, inputs: Any, token_ids: Sequence[int]) -> tuple[Any, torch.Tensor]:
        """``inputs`` with ``token_ids`` appended to every row, and the new tokens' positions."""
        ids = inputs["input_ids"]
        count = len(token_ids)
        start = ids.shape[-1]
        for key in list(inputs.keys()):
            value = inputs[key]
            if key == "input_ids":
                new = torch.as_tensor(list(token_ids), dtype=ids.dtype, device=ids.device).expand(ids.shape[0], count)
                inputs[key] = torch.cat([ids, new], dim=-1)
            elif key in self.per_token_fill and torch.is_tensor(value) and value.shape == ids.shape:
                fill = value.new_full((value.shape[0], count), self.per_token_fill[key])
                inputs[key] = torch.cat([value, fill], dim=-1)
        return inputs, torch.arange(start, start + count, dtype=torch.long)

    def _process(self, images: list[Any], question: str) -> Any:
        """The processor's outputs for one user turn: the prompt through the chat template, then the
        text and images through the processor (a family whose processor takes its turn otherwise
        overrides this, and :meth:`build_inputs` does the rest)."""
        prompt = self.prompt(len(images), question)
        kwargs: dict[str, Any] = {}
        bos = getattr(self.tokenizer, "bos_token", None)
        if bos and prompt.startswith(bos):
            kwargs["add_special_tokens"] = False  # the template wrote BOS already
        return self.processor(text=prompt, images=images or None, return_tensors="pt", **kwargs)

    def build_inputs(
        self, images: Sequence[Any], question: str, answer: str | None = None
    ) -> tuple[Any, torch.Tensor]:
        """Processed inputs for one user turn (images + question) on the model's device.

        With ``answer``, its tokens are appended (teacher forcing) and their sequence positions
        returned; otherwise the positions are empty. Positions, never strings, address tokens.
        The images' original sizes ride along as an attribute (``IMAGE_SIZES_ATTR``), not a key.
        """
        images = [images] if not isinstance(images, (list, tuple)) else list(images)
        inputs = self._process(images, question)
        for key in self.dropped_input_keys:
            inputs.pop(key, None)
        positions = torch.empty(0, dtype=torch.long)
        if answer is not None:
            inputs, positions = self.append_tokens(inputs, self.tokenize_answer(answer))
        inputs = inputs.to(device=self.device, dtype=self.dtype)
        sizes = [(int(image.height), int(image.width)) for image in images if hasattr(image, "height")]
        if len(sizes) == len(images):
            object.__setattr__(inputs, IMAGE_SIZES_ATTR, sizes)
        return inputs, positions

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_type={self.model_type!r})"


def _marker_positions(ids: torch.Tensor, image_positions: torch.Tensor, markers: set[int]) -> torch.Tensor:
    """Marker tokens inside an image's span and in the runs touching it on either side."""
    if image_positions.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    is_marker = torch.isin(ids, torch.tensor(sorted(markers), dtype=ids.dtype, device=ids.device))
    first, last = int(image_positions[0]), int(image_positions[-1])
    while first > 0 and bool(is_marker[first - 1]):
        first -= 1
    while last + 1 < ids.numel() and bool(is_marker[last + 1]):
        last += 1
    span = torch.arange(first, last + 1, device=ids.device)
    return span[is_marker[first : last + 1]].cpu()
