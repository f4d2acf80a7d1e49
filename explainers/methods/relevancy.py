"""Relevancy explainers (Chefer et al. 2021, rules 5-6), exact on the final sequence, per answer token.

The propagation itself (one forward with attention weights in the graph, one backward per answer
token folding gradient x attention into the token's row) is core code shared with the bench:
:mod:`xmllm.explainers.relevancy_propagation`. This module turns its rows into the explainers' maps. A family whose decoder reads the image through
cross-attention (Mllama) takes its rows from :mod:`xmllm.explainers.cross_attention` instead
(Chefer et al.'s co-attention rules), over the adapter's extended positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from xmllm.explainers.prepared import Prepared
from ..explanation import Explanation
from ..models import LoadedModel
from ..models.layout import grid_names
from ..params import ExplainerParams, ParamError, param
from ..citations import LVLM_INTERPRET
from ..registry import Citation, Explainer, Need, register
from ..relevancy_propagation import (
    DEFAULT_BATCH,
    DEFAULT_TARGET,
    DEFAULT_THROUGH,
    NORMALISATION,
    Relevancy,
    compute_relevancy,
)
from ..cross_attention import cross_relevancy
from ..memory import backward_copy_bytes
from ..recompute import RECOMPUTE_CHOICES, RECOMPUTE_HELP, resolve
from ..scaleplan import ScalePlan, costs

THROUGH: tuple[str, ...] = ("decoder", "vision", "both")
TARGETS: tuple[str, ...] = ("logit", "logprob")
MODALITIES: tuple[str, ...] = ("image", "text")
DEFAULT_TOP_K = 3
"""Prompt words listed per answer token in the modality view (LVLM-Interpret shows three)."""

CHEFER = Citation(
    "Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers",
    2021,
    "2103.15679",
    "Chefer, Gur, Wolf",
)


# --- from rows to maps ------------------------------------------------------------------------------


def add_image_maps(explanation: Explanation, prepared: Prepared, rows: torch.Tensor, answer: torch.Tensor) -> None:
    """Per-token (T, rows, cols) and whole-answer (rows, cols) maps of every grid."""
    for name, grid in grid_names(prepared.layouts):
        explanation.add(name, grid.gather(rows), ("answer_token", "row", "col"))
        explanation.add(f"{name}.answer", grid.gather(answer), ("row", "col"))


def add_prompt_maps(explanation: Explanation, prepared: Prepared, result: Relevancy) -> None:
    text = prepared.text_positions
    explanation.add("prompt", result.decoder[:, text], ("answer_token", "prompt_token"))
    explanation.add("prompt.answer", result.decoder_answer[text], ("prompt_token",))


def _rounded(values: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in values.tolist()]  # NaN -> None for JSON


def _nanmean(values: torch.Tensor) -> float:
    """Mean over the finite values (a token whose relevancy is all zero has no share)."""
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else float("nan")


def _common_meta(result: Relevancy) -> dict[str, Any]:
    decoder_total = result.decoder.sum(-1)
    earlier = result.decoder[:, result.prepared.answer_positions].sum(-1)
    return {
        "seq_len": result.prepared.seq_len,
        "logit_positions": result.prepared.logit_positions.tolist(),
        "target_values": [float(v) for v in result.targets.tolist()],
        "answer_token_share": _rounded(torch.where(decoder_total > 0, earlier / decoder_total, torch.nan)),
        "normalisation": NORMALISATION,
        "backward_calls": result.backward_calls,
        "batch": result.batch,
        "kernel": result.kernel,
    }  # the forward's and gradients' seconds stay out: the same input must give the same explanation


def _scale_plan(prep: Prepared) -> ScalePlan:
    """Both explainers' bench plan: every backward pass after the first repeats its sizes, so the
    measured run stops in the second."""
    answer = len(prep.answer.token_ids)
    return ScalePlan({}, f"stopped in its second of {answer + 1} backward passes (one per answer token and one for "
                     "the whole answer, each of the same sizes)", stop_backwards=1, cost=costs(1, answer + 1))


def _relevancy(prep: Prepared, explainer: str, params: Any, through: str) -> tuple[Relevancy, bool]:
    """The relevancy rows and whether blocks were recomputed: through the decoder's cross-attention
    where the family reads the image that way (every layer's weights kept, nothing recomputed), else
    through its sequence."""
    if prep.adapter.reads_image_through == "cross_attention":
        if through != "decoder":
            raise ParamError(f"{explainer}: through={through!r}: on {prep.adapter.model_type}, whose decoder reads "
                             "the image through cross-attention, relevancy runs through='decoder' only")
        if params.recompute is True:
            raise ParamError(f"{explainer}: recompute=True: the cross-attention relevancy keeps every layer's "
                             "weights and recomputes nothing; use recompute='auto' or false")
        return cross_relevancy(prep, target=params.target, explainer=explainer), False
    recompute = _recompute(prep, params.recompute, through)
    return compute_relevancy(prep, target=params.target, through=through, batch=params.batch, explainer=explainer,
                             recompute=recompute), recompute


def _recompute(prep: Prepared, setting: bool | str, through: str) -> bool:
    """``recompute`` resolved against what the kept run holds: every block's activations with eager
    attention (the relevancy forward keeps every layer's attention weights)."""
    return resolve(setting, lambda: backward_copy_bytes(prep, eager=True, through_vision=through != "decoder"),
                   prep.loaded.device, model=prep.model)


# --- the explainers --------------------------------------------------------------------------------


@register
class CheferRelevancy(Explainer):
    """Relevancy of image patches and prompt words for every answer token (rules 5-6: gradient x
    attention, positive part, head mean, propagated through the layers), through the decoder, the
    vision tower or both, exact on the final sequence (no KV-cache approximation).

    Cost: one forward, then one backward per answer token and one for the whole answer.
    Chefer, Gur and Wolf, 2021 (arXiv 2103.15679); LVLM-Interpret, 2024 (arXiv 2404.03118).
    """

    id = "relevancy.chefer"
    title = "Relevancy maps (Chefer et al.)"
    group = "relevancy"
    cross_attention_ready = True
    supports_contrast = True
    needs = frozenset({Need.ATTENTION, Need.GRADIENTS})
    citations = (CHEFER, LVLM_INTERPRET)
    summary = (
        "Chefer et al.'s gradient-weighted attention relevancy, computed exactly on the final sequence for "
        "every answer token (no KV-cache approximation), through the decoder, the vision tower, or both."
    )
    noise_hint = "use the logit target (--param relevancy.chefer.target=logit) or a contrast (--contrast OTHER)"

    @classmethod
    def scale_plan(cls, prep: Prepared, full_layers: int) -> ScalePlan:
        return _scale_plan(prep)

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        through: str = param(DEFAULT_THROUGH, "where the image maps' relevancy comes from: decoder, vision tower "
                                              "or both", choices=THROUGH)
        target: str = param(DEFAULT_TARGET, "what is explained: each answer token's log-prob or logit",
                            choices=TARGETS)
        batch: int = param(DEFAULT_BATCH, "answer-token targets per backward call", low=1)
        recompute: bool | str = param("auto", RECOMPUTE_HELP, choices=RECOMPUTE_CHOICES)

    def compute(self, model: LoadedModel, sample: Prepared, params: Params) -> Explanation:
        through = params.through
        prepared = sample
        result, recompute = _relevancy(prepared, self.id, params, through)

        exp = Explanation(self.id, {**params.as_dict(), "recompute": recompute}, prepared.target())
        add_image_maps(exp, prepared, result.image, result.image_answer)
        add_prompt_maps(exp, prepared, result)
        shares = result.shares(result.decoder)[:, 0]
        exp.scores["image_share"] = _nanmean(shares)
        exp.meta.update(_common_meta(result))
        exp.meta["image_share_per_token"] = _rounded(shares)
        exp.meta["maps_from"] = "decoder" if through == "decoder" else f"vision tower ({through})"
        return exp


@register
class ModalityRelevancy(Explainer):
    """How much each answer token draws on the image versus the prompt's words: the image and text
    shares of its decoder relevancy (Chefer et al.'s rules 5-6), with the prompt words that weigh most.

    Cost: one forward, then one backward per answer token and one for the whole answer.
    LVLM-Interpret, 2024 (arXiv 2404.03118); Chefer, Gur and Wolf, 2021 (arXiv 2103.15679).
    """

    id = "relevancy.modality"
    title = "Image vs text relevancy"
    group = "relevancy"
    cross_attention_ready = True
    supports_contrast = True
    needs = frozenset({Need.ATTENTION, Need.GRADIENTS})
    citations = (LVLM_INTERPRET, CHEFER)
    summary = (
        "Per answer token, the share of decoder relevancy (Chefer et al.) on image tokens versus prompt text "
        "tokens, with the prompt words that weigh most: LVLM-Interpret's image-vs-text view, computed exactly."
    )
    noise_hint = "use the logit target (--param relevancy.modality.target=logit) or a contrast"

    @classmethod
    def scale_plan(cls, prep: Prepared, full_layers: int) -> ScalePlan:
        return _scale_plan(prep)

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        target: str = param(DEFAULT_TARGET, "what is explained: each answer token's log-prob or logit",
                            choices=TARGETS)
        top_k: int = param(DEFAULT_TOP_K, "prompt words listed per answer token", low=1)
        batch: int = param(DEFAULT_BATCH, "answer-token targets per backward call", low=1)
        recompute: bool | str = param("auto", RECOMPUTE_HELP, choices=RECOMPUTE_CHOICES)

    def compute(self, model: LoadedModel, sample: Prepared, params: Params) -> Explanation:
        top_k = params.top_k
        prepared = sample
        result, recompute = _relevancy(prepared, self.id, params, "decoder")

        exp = Explanation(self.id, {**params.as_dict(), "recompute": recompute}, prepared.target())
        per_token = result.shares(result.decoder)
        whole = result.shares(result.decoder_answer)
        exp.add("share", per_token, ("answer_token", "modality"))
        exp.add("share.answer", whole, ("modality",))
        add_prompt_maps(exp, prepared, result)
        exp.scores["image_share"] = float(whole[0])
        exp.scores["text_share"] = float(whole[1])

        tokens = prepared.tokens()
        text = prepared.text_positions
        image = prepared.image_positions

        def top_words(row: torch.Tensor) -> list[dict[str, Any]]:
            values = row[text]
            total = float(values.sum())
            order = torch.argsort(values, descending=True, stable=True)[: min(top_k, values.numel())]
            return [
                {"position": int(text[i]), "token": tokens[int(text[i])], "relevancy": float(values[i]),
                 "share_of_text": float(values[i]) / total if total > 0 else None}
                for i in order.tolist()
            ]

        exp.meta.update(_common_meta(result))
        exp.meta["modalities"] = list(MODALITIES)
        exp.meta["top_prompt_tokens"] = [top_words(row) for row in result.decoder]
        exp.meta["top_prompt_tokens_answer"] = top_words(result.decoder_answer)
        exp.meta["image_max"] = [float(row[image].max()) if image.numel() else 0.0 for row in result.decoder]
        exp.meta["image_share_token_mean"] = _nanmean(per_token[:, 0])
        return exp
