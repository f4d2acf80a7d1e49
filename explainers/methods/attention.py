"""Attention views: raw answer->input attention, head x layer summaries, and attention rollout.

All three read each answer token's *generating row* (the query at its logit position), so a
repeated word keeps its own maps, and every grid comes from the adapter's layouts (no token
counts or offsets are assumed). Raw and summary capture during the model's own ``generate``
when given a fresh sample, or in one teacher-forced forward when given a :class:`Prepared`;
rollout needs every row of every layer and always uses the forward (see xmllm.explainers.capture).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..capture import (
    HEAD_FUSIONS,
    RolloutOptions,
    capture,
    capture_forward,
)
from xmllm.explainers.prepared import ExplainSample, Prepared, as_prepared
from ..cross_attention import attention_rows, attention_weights, cross_rollout, extended
from ..explanation import Explanation
from ..models import LoadedModel
from ..models.layout import grid_names
from ..params import ExplainerParams, ParamError, param
from ..citations import LVLM_INTERPRET
from ..registry import Citation, Explainer, Need, register

GROUP = "attention"

ABNAR_ZUIDEMA = Citation("Quantifying Attention Flow in Transformers", 2020, "2005.00928", "Abnar, Zuidema")
VL_INTERPRET = Citation(
    "VL-InterpreT: An Interactive Visualization Tool for Interpreting Vision-Language Transformers", 2022,
    "2203.17247", "Aflalo et al.",
)

RAW_IMAGE_AXES = ("answer_token", "layer", "head", "row", "col")
RAW_PROMPT_AXES = ("answer_token", "layer", "head", "prompt_token")
HEAD_AXES = ("layer", "head")
TEXT_MEANING = "the prompt's text tokens (question and template; target.prompt_positions), not image tokens"



def zscore(values: torch.Tensor) -> torch.Tensor:
    """Standard scores over all entries (VL-InterpreT's head summaries); zeros when all are equal.

    In float64: heads with near-equal means would otherwise lose their differences to rounding.
    """
    values = values.double()
    centred = values - values.mean()
    std = values.std(unbiased=False)
    return centred / std if float(std) > 0 else torch.zeros_like(values)


def _layers_param(layers: tuple[int, ...] | None, count: int) -> list[int]:
    """Decoder block indices (negative ones count from the end) checked against the model."""
    if layers is None:
        return list(range(count))
    picked = [i + count if i < 0 else i for i in layers]
    if not picked or any(not 0 <= i < count for i in picked):
        raise ParamError(f"layers={list(layers)!r}: the decoder has blocks 0..{count - 1}")
    return picked


def _meta(prepared: Prepared, source: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "source": source,
        "answer_row": "each answer token's generating row: the query at its logit position",
        "model_type": prepared.adapter.model_type,
        **(extra or {}),
    }


@register
class RawAttention(Explainer):
    """Per layer and head, the attention row that generated each answer token, over every image grid
    and the prompt's words (LVLM-Interpret's answer->image view, one row per answer position).

    On a family that reads the image through cross-attention (Mllama) the image maps are its
    cross-attention blocks' rows over the vision tokens, and the prompt's its self-attention blocks'
    (one teacher-forced forward).

    Cost: none beyond the answer's own generation (captured during generate), or one teacher-forced
    forward for a prepared sample; no backward. LVLM-Interpret, 2024 (arXiv 2404.03118).
    """

    id = "attention.raw"
    title = "Raw attention from each answer token to image patches and prompt words"
    group = GROUP
    needs = frozenset({Need.ATTENTION})
    citations = (LVLM_INTERPRET,)
    summary = (
        "Per layer and head, the attention row that produced each answer token, laid over every "
        "image grid and over the prompt's words (LVLM-Interpret's answer->image view, per position)."
    )

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        layers: tuple[int, ...] | None = param(None, "decoder blocks to keep (negative from the end); null keeps all")

    def ready(self, model: LoadedModel, sample: ExplainSample | Prepared) -> ExplainSample | Prepared:
        return sample  # a fresh sample is captured during the model's own generate

    cross_attention_ready = True

    def compute(self, model: LoadedModel, sample: ExplainSample | Prepared, params: Params) -> Explanation:
        picked = _layers_param(params.layers, len(model.adapter.decoder_layers()))
        if model.adapter.reads_image_through == "cross_attention":
            return self._cross(model, as_prepared(model, sample), picked)
        prepared, record = capture(model, sample, blocks=False)
        rows = record.rows.index_select(1, torch.as_tensor(picked))
        exp = Explanation(
            self.id, {"layers": picked}, prepared.target(),
            meta=_meta(prepared, record.source, {"layers": picked, "retained_bytes": record.nbytes()}),
        )
        for name, grid in grid_names(prepared.layouts):
            exp.add(name, grid.gather(rows), RAW_IMAGE_AXES)
        exp.add("prompt", rows.index_select(-1, prepared.text_positions), RAW_PROMPT_AXES)
        return exp

    def _cross(self, model: LoadedModel, prepared: Prepared, picked: list[int]) -> Explanation:
        """A family that reads the image through cross-attention: the image maps are the answer rows
        of its cross-attention blocks (over the vision tokens), the prompt's those of its
        self-attention blocks; each layer axis lists its own blocks (meta: image_layers, prompt_layers)."""
        blocks, rows = attention_rows(prepared, self.id)
        cross = [i for i, (block, kind) in enumerate(blocks) if kind == "cross" and block in picked]
        own = [i for i, (block, kind) in enumerate(blocks) if kind == "self" and block in picked]
        if not cross:
            crossing = [block for block, kind in blocks if kind == "cross"]
            raise ParamError(f"{self.id}: layers={picked}: none is a cross-attention block, where "
                             f"{model.adapter.model_type} reads the image (blocks {crossing})")
        image_layers, prompt_layers = [blocks[i][0] for i in cross], [blocks[i][0] for i in own]
        exp = Explanation(
            self.id, {"layers": picked}, prepared.target(),
            meta=_meta(prepared, "forward", {"layers": picked, "image_layers": image_layers,
                                             "prompt_layers": prompt_layers, "attention": "cross-attention"}),
        )
        image = extended(torch.stack([rows[i] for i in cross], dim=1), prepared)  # (T, layers, heads, positions)
        labels = {"prompt:layer": [str(block) for block in prompt_layers]}
        for name, grid in grid_names(prepared.layouts):
            exp.add(name, grid.gather(image), RAW_IMAGE_AXES)
            labels[f"{name}:layer"] = [str(block) for block in image_layers]
        exp.meta["axis_labels"] = labels
        if own:
            text = torch.stack([rows[i] for i in own], dim=1)
            exp.add("prompt", text.index_select(-1, prepared.text_positions), RAW_PROMPT_AXES)
        return exp


@register
class AttentionSummary(Explainer):
    """Mean attention per layer and head between answer, prompt text and image (answer->image,
    answer->text, text->image, image->image, text->text, image->text), each also as z-scores. Where
    the decoder cross-attends to the image (Mllama): the maps to the image from its cross-attention
    blocks, to the text from its self-attention blocks, none from the image.

    Cost: as attention.raw, one forward at most, no backward. LVLM-Interpret, 2024 (arXiv 2404.03118);
    VL-InterpreT, 2022 (arXiv 2203.17247).
    """

    id = "attention.summary"
    title = "Head x layer attention summary between answer, prompt text and image"
    group = GROUP
    needs = frozenset({Need.ATTENTION})
    citations = (LVLM_INTERPRET, VL_INTERPRET)
    summary = (
        "Mean attention per layer and head (all layers): answer->image and answer->text from the "
        "answer tokens' generating rows, text->image, image->image, text->text and image->text over "
        "the prompt, each also as z-scores across heads and layers (VL-InterpreT)."
    )

    def ready(self, model: LoadedModel, sample: ExplainSample | Prepared) -> ExplainSample | Prepared:
        return sample  # a fresh sample is captured during the model's own generate

    cross_attention_ready = True

    def compute(self, model: LoadedModel, sample: ExplainSample | Prepared, params: ExplainerParams) -> Explanation:
        if model.adapter.reads_image_through == "cross_attention":
            return self._cross(as_prepared(model, sample))
        prepared, record = capture(model, sample, blocks=True)
        images, text = prepared.image_positions, prepared.text_positions
        means: dict[str, torch.Tensor] = {}
        masses: dict[str, float] = {}
        for name, keys in (("answer_to_image", images), ("answer_to_text", text)):
            if keys.numel():
                picked = record.rows.index_select(-1, keys)  # (T, L, H, keys)
                means[name] = picked.mean(dim=(0, 3))
                masses[name.replace("answer_to_", "answer_mass_")] = float(picked.sum(-1).mean())
        means.update(record.blocks)
        exp = Explanation(
            self.id, {}, prepared.target(), scores=masses,
            meta=_meta(prepared, record.source, {
                "text": TEXT_MEANING,
                "mean": "mean weight over the block's (query, key) pairs; masked pairs count as zero",
                "z": "z-score over all layers and heads of the same map",
                "retained_bytes": record.nbytes(),
            }),
        )
        for name, values in means.items():
            exp.add(name, values, HEAD_AXES)
            exp.add(f"{name}.z", zscore(values), HEAD_AXES)
        return exp

    def _cross(self, prepared: Prepared) -> Explanation:
        """Where the decoder cross-attends to the image (Mllama): the maps to the image over its
        cross-attention blocks (queries: the answer rows; the prompt's text tokens that see the image),
        the maps to the text over its self-attention blocks; none from the image, whose tokens the
        decoder never updates. Each map's layer axis names its own blocks."""
        blocks, weights = attention_weights(prepared, self.id)
        seq, text, answer = prepared.seq_len, prepared.text_positions, prepared.logit_positions
        image = prepared.image_positions - seq
        cross = [i for i, (_, kind) in enumerate(blocks) if kind == "cross"]
        own = [i for i, (_, kind) in enumerate(blocks) if kind == "self"]
        pairs = {"answer_to_image": (cross, answer, image), "answer_to_text": (own, answer, text),
                 "text_to_image": (cross, text, image), "text_to_text": (own, text, text)}
        means: dict[str, torch.Tensor] = {}
        masses: dict[str, float] = {}
        labels: dict[str, list[str]] = {}
        for name, (which, queries, keys) in pairs.items():
            if not which or not queries.numel() or not keys.numel():
                continue
            picked = torch.stack([weights[i].index_select(1, queries).index_select(2, keys) for i in which])
            means[name] = picked.mean(dim=(2, 3))  # (layers, heads)
            labels[f"{name}:layer"] = labels[f"{name}.z:layer"] = [str(blocks[i][0]) for i in which]
            if name.startswith("answer_to_"):
                masses[name.replace("answer_to_", "answer_mass_")] = float(picked.sum(-1).mean())
        exp = Explanation(
            self.id, {}, prepared.target(), scores=masses,
            meta=_meta(prepared, "forward", {
                "text": TEXT_MEANING,
                "mean": "mean weight over the block's (query, key) pairs; masked pairs count as zero",
                "z": "z-score over all layers and heads of the same map",
                "attention": "cross-attention blocks for the maps to the image, self-attention blocks for the "
                             "maps to the text; no map from the image (the decoder never updates its tokens)",
                "axis_labels": labels,
            }),
        )
        for name, values in means.items():
            exp.add(name, values, HEAD_AXES)
            exp.add(f"{name}.z", zscore(values), HEAD_AXES)
        return exp


@register
class AttentionRollout(Explainer):
    """Attention rollout: per layer 0.5 I + 0.5 A (heads fused), multiplied through the decoder and read
    at each answer token's generating row; optionally carried on through the vision tower. Where the
    decoder cross-attends to the image (Mllama), its cross-attention blocks join the product (each text
    token mixed half with the vision tokens it attends).

    Cost: one teacher-forced forward keeping every layer's full attention, no backward. Abnar and
    Zuidema, 2020 (arXiv 2005.00928); LVLM-Interpret, 2024 (arXiv 2404.03118).
    """

    id = "attention.rollout"
    title = "Attention rollout through the decoder (and optionally the vision tower)"
    group = GROUP
    needs = frozenset({Need.ATTENTION})
    citations = (ABNAR_ZUIDEMA, LVLM_INTERPRET)
    summary = (
        "Abnar & Zuidema's rollout: per layer 0.5 I + 0.5 A with heads fused, rows normalised, "
        "multiplied through the decoder and read at each answer token's generating row; with "
        "through_vision, carried on through the vision tower onto its patch grid."
    )

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        head_fusion: str = param("mean", "how each layer's heads become one matrix", choices=HEAD_FUSIONS)
        discard_ratio: float = param(0.0, "share of each row's smallest non-zero weights set to zero",
                                     low=0.0, high=1.0, high_open=True)
        through_vision: bool = param(False, "carry the rollout on through the vision tower onto its patch grid")

    cross_attention_ready = True  # where the image is cross-attended, rolled out through those blocks too

    def compute(self, model: LoadedModel, sample: Prepared, params: Params) -> Explanation:
        through_vision = params.through_vision
        options = RolloutOptions(params.head_fusion, params.discard_ratio)
        prepared = sample
        if model.adapter.reads_image_through == "cross_attention":
            if through_vision:
                raise ParamError(f"{self.id}: through_vision=True is not supported for {model.adapter.model_type}, "
                                 "whose decoder reads the image through cross-attention")
            rollout = cross_rollout(prepared, options, self.id)
            meta = _meta(prepared, "forward", {"residual": "0.5 I + 0.5 A, rows normalised; a cross-attention block "
                                               "mixes each text token half with the vision tokens it attends",
                                               "discard": "per row, smallest non-zero weights"})
            exp = Explanation(self.id, params.as_dict(), prepared.target(), meta=meta)
            self._add_maps(exp, prepared, rollout)
            return exp
        depth = vision_depth(model) if through_vision else None
        try:
            record = capture_forward(
                prepared, blocks=False, rollout=options, vision=options if through_vision else None, vision_depth=depth
            )
        except ValueError as error:
            if through_vision:
                raise ParamError(f"through_vision=True is not supported for {prepared.adapter.model_type}: {error}") from None
            raise
        rollout = record.decoder_rollout
        assert rollout is not None
        meta = _meta(prepared, record.source, {"residual": "0.5 I + 0.5 A, rows normalised",
                                               "discard": "per row, smallest non-zero weights"})
        exp = Explanation(self.id, params.as_dict(), prepared.target(), meta=meta)
        self._add_maps(exp, prepared, rollout)
        if through_vision:
            assert record.vision_rollout is not None
            projected = project_through_vision(prepared, rollout, record.vision_rollout)
            exp.add("image.vision", projected, ("answer_token", "row", "col"))
            exp.add("image.vision.answer", projected.mean(0), ("row", "col"))
            meta["vision_layers"] = depth
        return exp


    @staticmethod
    def _add_maps(exp: Explanation, prepared: Prepared, rollout: torch.Tensor) -> None:
        """Per answer token and for the whole answer (their mean): every grid and the prompt's words."""
        for name, grid in grid_names(prepared.layouts):
            per_token = grid.gather(rollout)
            exp.add(name, per_token, ("answer_token", "row", "col"))
            exp.add(f"{name}.answer", per_token.mean(0), ("row", "col"))
        prompt = rollout.index_select(-1, prepared.text_positions)
        exp.add("prompt", prompt, ("answer_token", "prompt_token"))
        exp.add("prompt.answer", prompt.mean(0), ("prompt_token",))


# --- through the vision tower ---------------------------------------------------------------------


def vision_depth(loaded: Any) -> int:
    """How many vision blocks feed the projector (LLaVA reads ``hidden_states[vision_feature_layer]``)."""
    total = len(loaded.adapter.vision_layers())
    chosen = getattr(loaded.model.config, "vision_feature_layer", None)
    if chosen is None:
        return total
    indices = [i if i >= 0 else total + 1 + i for i in (chosen if isinstance(chosen, (list, tuple)) else [chosen])]
    return max(indices)


def _class_tokens(loaded: Any) -> int:
    """Leading class tokens of the vision tower's sequence (CLIP: one; SigLIP: none)."""
    names = (name for name, _ in loaded.adapter.vision_tower.named_parameters())
    return sum(1 for name in names if name.split(".")[-1] == "class_embedding")


def project_through_vision(prepared: Prepared, rollout: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
    """Carry the decoder rollout over a one-to-one image grid on through the vision rollout.

    Grid cell j's image token stands for vision patch j; its decoder relevance is spread over
    the patches by the vision rollout's row j (class-token rows and columns excluded), giving
    ``(T, rows, cols)``. Needs one image, one grid, one vision sequence and as many patches as
    cells: what LLaVA (CLIP) and PaliGemma (SigLIP) give; merged or tiled towers do not.
    """
    model_type = prepared.adapter.model_type
    layouts = prepared.layouts
    if len(layouts) != 1 or len(layouts[0].grids) != 1 or vision.shape[0] != 1:
        raise ParamError(
            f"through_vision=True needs one image with one grid and one vision sequence; {model_type} gives "
            f"{len(layouts)} image(s), {sum(len(l.grids) for l in layouts)} grid(s), {vision.shape[0]} sequence(s)"
        )
    grid = layouts[0].grids[0]
    lead = _class_tokens(prepared.loaded)
    patches = vision.shape[-1] - lead
    if patches != grid.size:
        raise ParamError(
            f"through_vision=True: {model_type}'s vision tower has {patches} patch tokens but the grid has "
            f"{grid.rows}x{grid.cols} cells; only one-to-one towers are supported"
        )
    patch_rollout = vision[0, lead:, lead:].to(rollout.device)  # (patches, patches), class token excluded
    cells = rollout.index_select(-1, grid.positions.to(rollout.device))  # (T, cells)
    return (cells @ patch_rollout).reshape(-1, grid.rows, grid.cols)

