"""The same explainer on two checkpoints, side by side: how training changed an explanation.

Both checkpoints explain the same answer by default (the first model's greedy answer, forced on
the second), so every map lines up entry by entry and the differences are differences of
explanation, not of answer length; each checkpoint's own greedy answer is reported as well.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from xmllm.explainers.forward import logprobs_at

from ..answering import Answer, generate_answer
from xmllm.explainers.prepared import Prepared, prepare
from ..explanation import Explanation
from ..models import LoadedModel
from ..occlusion_scale import occlusion_scale
from ..params import ExplainerParams, ParamError, param
from ..registry import Citation, Explainer, Need, RegistryError, get_explainer, register
from ..scaleplan import ScalePlan, costs, decode_step, trials_for

GROUP = "training"

RLHF_V = Citation(
    "RLHF-V: Towards Trustworthy MLLMs via Behavior Alignment from Fine-grained Correctional Human Feedback",
    2023, "2312.00849", "Yu et al.",
)
LRV = Citation(
    "Mitigating Hallucination in Large Multi-Modal Models via Robust Instruction Tuning", 2023, "2306.14565",
    "Liu, Lin, Li, Wang, Yacoob, Wang",
)
ADEBAYO = Citation("Sanity Checks for Saliency Maps", 2018, "1810.03292",
                   "Adebayo, Gilmer, Muelly, Goodfellow, Hardt, Kim")

DEMO_PAIRS: dict[str, str] = {"demo": "demo-early"}
"""The checkpoint compared with by default, per model spec (the demo ships an early one)."""
SIDES: tuple[str, str] = ("model", "other")
DIFF = "diff"


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation of two equally shaped arrays (average ranks for ties).

    Identical arrays correlate 1 by definition (constant ones included); otherwise None where it is
    undefined (one array constant).
    """
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"rank correlation needs equal shapes, got {a.shape} and {b.shape}")
    if np.array_equal(x, y):
        return 1.0
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / denominator if denominator > 0 else None


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.arange(values.size, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def load_other(model: Any, other: Any) -> Any:
    """``other`` as a LoadedModel: given one, or loaded from a spec like ``model`` (device, dtype,
    attention kernel); None means the spec's known partner (``demo`` -> ``demo-early``)."""
    from ..models import load_model

    if isinstance(other, LoadedModel):
        return other
    if other is None:  # the known partner (unmet refuses a model without one)
        other = DEMO_PAIRS.get(getattr(model, "spec", None))
    if not isinstance(other, str) or not other.strip():
        raise ParamError(f"parameter other={other!r} must be a model spec (a folder, a hub id or 'demo-early')")
    dispatch = getattr(model, "dispatch", None)
    if dispatch is not None:  # dispatched as the explained model is (its own scratch offload folder)
        return load_model(other, dtype=model.dtype, eager_attention=model.eager_attention,
                          device_map=dispatch.device_map, device_memory=dispatch.max_memory)
    return load_model(other, device=model.device, dtype=model.dtype, eager_attention=model.eager_attention)


@torch.inference_mode()
def forced(loaded: Any, prep: Prepared) -> Prepared:
    """``prep``'s sample and answer on another checkpoint, with that checkpoint's token probabilities."""
    theirs = prep.loaded.processor.tokenizer.get_vocab()
    ours = loaded.processor.tokenizer.get_vocab()
    if theirs != ours:
        raise ParamError("the two checkpoints have different vocabularies: compare with same_answer=False")
    other = prepare(loaded, prep.sample, answer=prep.answer)
    ids = torch.as_tensor(prep.answer.token_ids, dtype=torch.long)
    logp = logprobs_at(other.model, dict(other.inputs), other.logit_positions, ids)[0].cpu()
    answer = Answer(prep.answer.text, prep.answer.token_ids, prep.answer.tokens, tuple(logp.exp().tolist()))
    return replace(other, answer=answer)


def _spec(loaded: Any) -> dict[str, Any]:
    return {"spec": loaded.spec, "source": loaded.source, "weights_sha256": loaded.weights_sha256}


@register
class CompareCheckpoints(Explainer):
    """Any sample-level explainer run on this model and on another checkpoint (before and after
    training) on the same answer: both maps, their difference entry by entry, the rank correlation
    of each map, and each checkpoint's own greedy answer.

    Cost: the inner explainer's cost twice (occlusion's at the defaults), one teacher-forced forward
    and one generation on the other checkpoint, plus loading it. RLHF-V, 2023 (arXiv 2312.00849);
    LRV-Instruction, 2023 (arXiv 2306.14565); Adebayo et al., 2018 (arXiv 1810.03292).
    """

    id = "training.compare"
    title = "One explainer on two checkpoints, side by side"
    group = GROUP
    needs = frozenset({Need.CHECKPOINTS})
    citations = (RLHF_V, LRV, ADEBAYO)
    summary = (
        "Run any sample-level explainer on this model and on another checkpoint (e.g. before and after "
        "training), on the same answer: both maps, their difference, the rank correlation of each map "
        "and each checkpoint's own answer."
    )

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        explainer: str = param("perturbation.occlusion", "id of the sample-level explainer run on both checkpoints")
        other: Any = param(None, "the checkpoint compared with: a LoadedModel or a model spec (null: the spec's "
                                 "known partner, demo -> demo-early)", cli=False)
        params: dict[str, Any] | None = param(None, "the inner explainer's parameters, checked by its declaration")
        same_answer: bool = param(True, "explain the first model's answer on both checkpoints (False: each its own)")

    @classmethod
    def check_params(cls, params: Mapping[str, Any] | None) -> ExplainerParams:
        """The declared checks, then the inner explainer's id and its ``params`` against that
        explainer's own declaration, and ``other``'s kind: all before any model work."""
        checked = super().check_params(params)
        try:
            inner_cls = get_explainer(checked.explainer)
        except RegistryError as error:
            raise ParamError(f"{cls.id}: parameter explainer: {error}") from None
        if inner_cls.scope != "sample" or inner_cls is cls:
            raise ParamError(f"{cls.id}: parameter explainer={checked.explainer!r} must be a sample-level explainer "
                             f"other than {cls.id}")
        try:
            inner_cls.check_params(checked.params)
        except ParamError as error:
            raise ParamError(f"{cls.id}: parameter params: {error}") from None
        other = checked.other
        spec = isinstance(other, str) and bool(other.strip())
        if other is not None and not spec and not isinstance(other, LoadedModel):
            raise ParamError(f"{cls.id}: parameter other={other!r} must be a model spec (a folder, a hub id or "
                             "'demo-early') or a LoadedModel")
        return checked

    @classmethod
    def scale_plan(cls, prep: Prepared, full_layers: int) -> ScalePlan:
        """The model against itself, its occlusion (the default inner explainer) measured as occlusion's
        own plan measures it: larger windows than one cell, never fewer copies than a batch."""
        occlusion = occlusion_scale(prep)
        return ScalePlan({"other": prep.loaded, "params": {}}, "the model against itself; its occlusion as occlusion's",
                         occlusion.copies, trials_for(occlusion.copies),
                         lambda p, b: {**p, "params": {"window": occlusion.window_for(b), "batch_size": b}},
                         cost=costs(2 * occlusion.cost["forwards"] + 1 + decode_step(prep)))

    def unmet(self, model: LoadedModel, sample: Any, params: Params) -> str | None:
        if params.other is None and DEMO_PAIRS.get(getattr(model, "spec", None)) is None:
            return "needs a second checkpoint to compare with: pass other=MODEL (a folder or hub id)"
        return None

    def compute(self, model: LoadedModel, sample: Prepared, params: Params) -> Explanation:
        inner_cls = get_explainer(params.explainer)
        inner_params = dict(params.params or {})
        same_answer = params.same_answer
        prep = sample
        loaded = load_other(model, params.other)
        other_prep = forced(loaded, prep) if same_answer else prepare(loaded, prep.sample)
        own = other_prep.answer if not same_answer else generate_answer(loaded, prep.sample.images,
                                                                         prep.sample.question)
        results = []
        for side, side_prep in zip(SIDES, (prep, other_prep)):
            torch.manual_seed(0)
            results.append(inner_cls().explain(side_prep.loaded, side_prep, **inner_params))
        first, second = results

        exp = Explanation(self.id, {**params.as_dict(cli_only=True), "other": _spec(loaded)["spec"],
                                    "params": inner_params}, prep.target())
        correlations: dict[str, float | None] = {}
        skipped = []
        for name, axes in first.axes.items():
            a = first.maps[name]
            b = second.maps.get(name)
            exp.add(f"{SIDES[0]}.{name}", a, axes)
            if b is None:
                skipped.append(name)
                continue
            exp.add(f"{SIDES[1]}.{name}", b, second.axes[name])
            if a.shape != b.shape or second.axes[name] != axes or not np.issubdtype(a.dtype, np.number):
                skipped.append(name)
                continue
            difference = b.astype(np.float64) - a.astype(np.float64)
            exp.add(f"{DIFF}.{name}", difference, axes)
            correlations[name] = rank_correlation(a, b)
            exp.scores[f"max_abs_diff.{name}"] = float(np.abs(difference).max()) if difference.size else 0.0
            if correlations[name] is not None:
                exp.scores[f"rank_correlation.{name}"] = float(correlations[name])
        for side, result in zip(SIDES, results):
            for key, value in result.scores.items():
                exp.scores[f"{side}.{key}"] = float(value)
        answer_a = prep.answer
        exp.scores.update({"same_greedy_answer": float(own.token_ids == answer_a.token_ids)})
        exp.meta.update({
            "models": {SIDES[0]: _spec(prep.loaded), SIDES[1]: _spec(loaded)},
            "answers": {
                SIDES[0]: answer_a.to_json(),
                SIDES[1]: own.to_json(),
                "explained": answer_a.text,
                "explained_probs": {SIDES[0]: list(answer_a.probs), SIDES[1]: list(other_prep.answer.probs)},
            },
            "rank_correlation": correlations,
            "not_compared": skipped,
            "inner_meta": {SIDES[0]: first.meta, SIDES[1]: second.meta},
            "inner_params": {SIDES[0]: first.params, SIDES[1]: second.params},
            "diff": f"{SIDES[1]}.MAP - {SIDES[0]}.MAP, entry by entry",
            "rank_correlation_note": "Spearman over all entries of a map; 1 for identical maps, None if undefined",
        })
        for key, value in first.meta.items():  # axis labels of the inner maps, for the report
            if key in ("axis_labels", "layers") or key.endswith("_labels"):
                exp.meta.setdefault(key, value)
        if not same_answer:
            exp.meta["answers"]["explained"] = {SIDES[0]: answer_a.text, SIDES[1]: other_prep.answer.text}
        return exp
