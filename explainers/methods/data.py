"""Counterfactual edits of the input: what the model answers when the asked-about object is
recoloured, moved or removed, or when the question is worded differently.

On a demo-world sample the ground truth rides in ``sample.extra`` (``question_type``, ``objects``):
the scene and the question's structure are rebuilt from it (:mod:`xmllm.explainers.demo.groundtruth`),
the question type's own edits (:func:`xmllm.explainers.demo.samples.counterfactuals` and the
type's answer-flipping edit, as in :func:`xmllm.explainers.demo.samples.make_pair`) produce each
edited image with its new right answer, and the model answers every edit by its own greedy decoding.
Any other sample can only be reworded: pass ``rephrasings``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..answering import Answer, generate_answer, is_correct, normalise
from ..axes import axis_labels
from ..citations import LVLM_INTERPRET, MMVP
from xmllm.explainers.prepared import ExplainSample, Prepared, prepare
from ..demo.groundtruth import demo_sample_from
from ..explanation import Explanation
from ..forward import logprobs_at
from ..models import LoadedModel
from ..params import ExplainerParams, ParamError, param
from ..registry import Citation, Explainer, register
from ..scaleplan import ScalePlan, costs, decode_step

GROUP = "data"

WACHTER = Citation(
    "Counterfactual Explanations without Opening the Black Box: Automated Decisions and the GDPR", 2017,
    "1711.00399", "Wachter, Mittelstadt, Russell",
)

ORIGINAL = "original"
"""The ``kind`` of the table's first row: the unedited sample, the reference of every flip."""


# --- the edits ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    """One edited input and what the right answer becomes (None: unknown)."""

    kind: str
    description: str
    sample: ExplainSample
    expected: str | None
    objects: list[dict] | None = None


def demo_edits(demo: Any, seed: int) -> list[Edit]:
    """Recolour, move, remove and rephrase (the demo's own counterfactuals), plus the question
    type's answer-flipping edit when it is a different scene."""
    from ..demo.samples import DemoSample, counterfactuals, make_pair

    edited = counterfactuals(demo, seed)
    twin = DemoSample(demo.id, demo.scene, demo.question, demo.answer)  # make_pair marks its input
    partner = make_pair(twin, seed)
    if partner is not None and all(partner.scene != e.scene for e in edited):
        edited.append(partner)
    out = []
    for e in edited:
        kind = e.id.rsplit("-", 1)[-1]
        kind = "flip" if kind == "pair" else "rephrase" if kind.startswith("rephrase") else kind
        image_edit = e.scene != demo.scene
        out.append(Edit(kind, e.edit or kind, ExplainSample([e.image()], e.text, id=e.id, expected=e.answer),
                        e.answer, e.scene.to_json() if image_edit else None))
    return out


def rephrase_edits(sample: ExplainSample, rephrasings: Sequence[str]) -> list[Edit]:
    """The sample's images with each new wording; the right answer stays what it was."""
    out = []
    for k, text in enumerate(rephrasings):
        if not isinstance(text, str) or not text.strip():
            raise ParamError(f"parameter rephrasings[{k}]={text!r} must be a non-empty question")
        out.append(Edit("rephrasing", f"rephrase: {text}", ExplainSample(list(sample.images), text,
                                                                         id=f"{sample.id}-rephrasing{k}"),
                        sample.expected))
    return out


def joint_prob(answer: Answer) -> float:
    """Probability of the whole greedy answer: the product of its tokens' probabilities."""
    return float(math.exp(sum(math.log(max(p, 1e-45)) for p in answer.probs))) if answer.probs else 0.0


@torch.inference_mode()
def forced_prob(loaded: Any, sample: ExplainSample, answer: Answer) -> float:
    """Probability of ``answer``'s tokens (teacher-forced, jointly) as the answer to ``sample``."""
    prep = prepare(loaded, sample, answer=answer)
    ids = torch.as_tensor(answer.token_ids, dtype=torch.long)
    logp = logprobs_at(prep.model, dict(prep.inputs), prep.logit_positions, ids)[0]
    return float(logp.double().sum().exp())


@register
class Counterfactual(Explainer):
    """The model's own answer to each counterfactual edit of the input (the asked-about object
    recoloured, moved or removed, the question reworded, the answer-flipping edit): whether it
    flipped, and whether it flipped exactly when the right answer did.

    Cost: one greedy generation and one teacher-forced forward per edit (three to five on a demo
    sample), no backward. Wachter et al., 2017 (arXiv 1711.00399); MMVP, 2024 (arXiv 2401.06209);
    LVLM-Interpret, 2024 (arXiv 2404.03118).
    """

    id = "data.counterfactual"
    title = "Counterfactual edits: answer flips"
    group = GROUP
    citations = (WACHTER, MMVP, LVLM_INTERPRET)
    summary = (
        "Recolour, move or remove the asked-about object and reword the question (demo world; any "
        "sample with given rephrasings), then ask the model again: a table of expected answer, model "
        "answer, its probability, and whether the answer flipped and is right."
    )

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        rephrasings: tuple[str, ...] | None = param(
            None, "other wordings of the question to ask (the only edit of a sample without demo ground truth)")
        seed: int = param(0, "seed of the demo world's edits (which colour, where to)")

    @classmethod
    def scale_plan(cls, prep: Prepared, full_layers: int) -> ScalePlan:
        """One rephrasing instead of the demo's edits: each edit is one generation and one forward of
        the same size, so the peak is one edit's; the cost counts every edit of the demo sample."""
        demo = demo_sample_from(prep.sample)
        edits = len(demo_edits(demo, 0)) if demo is not None else 1
        return ScalePlan({"rephrasings": [prep.sample.question + " ?"]},
                         f"one rephrasing instead of the demo's {edits} edits (each one generation and one forward "
                         "of the same size)", no_truth=True,
                         cost=costs(edits * (2 + decode_step(prep))))

    def unmet(self, model: LoadedModel, sample: ExplainSample, params: Params) -> str | None:
        if demo_sample_from(sample) is None and not params.rephrasings:
            return ("needs demo-world ground truth (the scene's objects and the question type) to edit the "
                    "image; pass rephrasings=[...] to reword the question instead")
        return None

    def compute(self, model: LoadedModel, sample: Prepared, params: Params) -> Explanation:
        rephrasings, seed = params.rephrasings, params.seed
        prep = sample
        source = prep.sample
        demo = demo_sample_from(source)  # None only with rephrasings (unmet refuses the rest)
        edits = (demo_edits(demo, seed) if demo is not None else []) + rephrase_edits(source, rephrasings or [])
        expected0 = demo.answer if demo is not None else source.expected
        rows = [_row(ORIGINAL, "no edit", source.question, expected0, prep.answer, joint_prob(prep.answer),
                     prep.answer, expected0, None)]
        for edit in edits:
            answer = generate_answer(model, edit.sample.images, edit.sample.question)
            rows.append(_row(edit.kind, edit.description, edit.sample.question, edit.expected, answer,
                             forced_prob(model, edit.sample, prep.answer), prep.answer, expected0, edit.objects))
        return _table(self.id, prep, rows, {**params.as_dict(), "rephrasings": list(rephrasings or [])},
                      "demo" if demo is not None else "rephrasings")


def _row(kind: str, description: str, question: str, expected: str | None, answer: Answer, prob_original: float,
         original: Answer, expected0: str | None, objects: list[dict] | None) -> dict[str, Any]:
    flipped = normalise(answer.text) != normalise(original.text)
    expected_flip = None if expected is None or expected0 is None else normalise(expected) != normalise(expected0)
    row: dict[str, Any] = {
        "kind": kind,
        "edit": description,
        "question": question,
        "expected": expected,
        "answer": answer.text,
        "answer_tokens": list(answer.tokens),
        "prob": joint_prob(answer),
        "prob_original": prob_original,
        "flipped": flipped,
        "expected_flip": expected_flip,
        "correct": None if expected is None else is_correct(answer.text, expected),
    }
    if objects is not None:
        row["objects"] = objects
    return row


def _flag(value: bool | None) -> float:
    return float("nan") if value is None else float(value)


def _table(eid: str, prep: Prepared, rows: list[dict[str, Any]], params: dict[str, Any], source: str) -> Explanation:
    exp = Explanation(eid, params, prep.target())
    for column in ("prob", "prob_original"):
        exp.add(column, np.array([r[column] for r in rows], dtype=np.float64), ("edit",))
    for column in ("flipped", "expected_flip", "correct"):
        exp.add(column, np.array([_flag(r[column]) for r in rows], dtype=np.float64), ("edit",))
    edits = rows[1:]
    known = [r for r in edits if r["correct"] is not None]
    judged = [r for r in edits if r["expected_flip"] is not None]
    exp.scores.update({
        "edits": float(len(edits)),
        "flip_rate": float(np.mean([r["flipped"] for r in edits])) if edits else 0.0,
        "prob_answer": rows[0]["prob"],
    })
    if known:
        exp.scores["accuracy_edits"] = float(np.mean([r["correct"] for r in known]))
    if judged:
        exp.scores["consistency"] = float(np.mean([r["flipped"] == r["expected_flip"] for r in judged]))
    exp.meta.update({
        "source": source,
        "rows": rows,
        **axis_labels({"edit": [ORIGINAL if r["kind"] == ORIGINAL else r["edit"] for r in rows]}),
        "columns": {
            "prob": "joint probability of the model's greedy answer to the edited input",
            "prob_original": "probability of the original answer (teacher-forced) on the edited input",
            "flipped": "1 if the greedy answer differs from the answer to the unedited input",
            "expected_flip": "1 if the right answer changes with the edit (NaN: unknown)",
            "correct": "1 if the greedy answer matches the right answer after the edit (NaN: unknown)",
        },
        "consistency": "share of edits where the answer flipped exactly when the right answer changed",
    })
    return exp


__all__ = [
    "Counterfactual",
    "Edit",
    "demo_edits",
    "forced_prob",
    "joint_prob",
    "rephrase_edits",
]
