"""Counterfactual edits of the input: what the model answers when the asked-about object is
recoloured, moved or removed, or when the question is worded differently.

On a demo-world sample the ground truth rides in ``sample.extra`` (``family``, ``objects``): the
scene and the question's structure are rebuilt from it, the question family's own edits
(:func:`xmllm.explainers.demo.samples.counterfactuals` and the family's answer-flipping edit, as in
:func:`xmllm.explainers.demo.samples.make_pair`) produce each edited image with its new right
answer, and the model answers every edit by its own greedy decoding. Any other sample can
only be reworded: pass ``rephrasings``.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..answering import Answer, generate_answer, is_correct, normalise
from ..context import ExplainSample, Prepared, prepare
from ..explanation import Explanation
from ..models import LoadedModel
from ..params import ExplainerParams, param
from ..registry import Citation, Explainer, register
from .intervention import axis_labels
from xmllm.explainers.forward import logprobs_at

FAMILY = "data"

WACHTER = Citation(
    "Counterfactual Explanations without Opening the Black Box: Automated Decisions and the GDPR", 2017,
    "1711.00399", "Wachter, Mittelstadt, Russell",
)
MMVP = Citation(
    "Eyes Wide Shut? Exploring the Visual Shortcomings of Multimodal LLMs", 2024, "2401.06209",
    "Tong, Liu, Zhai, Ma, LeCun, Xie",
)
LVLM_INTERPRET = Citation(
    "LVLM-Interpret: An Interpretability Tool for Large Vision-Language Models", 2024, "2404.03118",
    "Ben Melech Stan et al.",
)

ORIGINAL = "original"
"""The ``kind`` of the table's first row: the unedited sample, the reference of every flip."""


# --- demo samples back from their ground truth -----------------------------------------------------


def _slot_values() -> dict[str, list[str]]:
    from ..demo.world import COLOURS, SHAPES

    names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    return {"shape": list(SHAPES), "colour": list(COLOURS), "a": names, "b": names}


def _template_pattern(template: str) -> re.Pattern[str]:
    """A template's wording as a regular expression with one named group per slot."""
    values = _slot_values()
    parts = re.split(r"{(\w+)}", template)
    out = []
    for k, part in enumerate(parts):
        if k % 2:
            options = sorted(values[part], key=len, reverse=True)
            out.append(f"(?P<{part}>{'|'.join(map(re.escape, options))})")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))


def parse_question(family: str, text: str) -> Any:
    """The demo :class:`~xmllm.explainers.demo.questions.Question` whose wording is ``text``."""
    from ..demo.questions import ALL_FAMILIES, Question

    kind = ALL_FAMILIES.get(family)
    if kind is None:
        raise ValueError(f"extra['family']={family!r} is not a demo question family ({', '.join(ALL_FAMILIES)})")
    variants = getattr(kind, "by_kind", {"": kind.templates})
    for templates in variants.values():
        for index, template in enumerate(templates):
            found = _template_pattern(template).fullmatch(text.strip())
            if found is None:
                continue
            question = Question(family, index, tuple(sorted(found.groupdict().items())))
            if question.text() == text.strip():
                return question
    raise ValueError(f"question {text!r} is not one of the demo {family!r} family's wordings")


def demo_sample_from(sample: ExplainSample) -> Any | None:
    """The demo-world sample behind ``sample`` (scene and question rebuilt from ``extra``), or
    None when ``extra`` carries no demo ground truth."""
    from ..demo.samples import DemoSample
    from ..demo.world import IMAGE_SIZE, Scene

    extra = sample.extra or {}
    if "objects" not in extra or "family" not in extra:
        return None
    try:
        scene = Scene.from_json(list(extra["objects"]), IMAGE_SIZE)
    except (TypeError, ValueError) as error:
        raise ValueError(f"sample {sample.id!r}: extra['objects'] is not a list of demo objects ({error})") from None
    question = parse_question(str(extra["family"]), sample.question)
    answer = sample.expected if sample.expected is not None else question.answer(scene)
    if answer is None:
        raise ValueError(f"sample {sample.id!r}: the question has no single answer on the scene in extra['objects']")
    return DemoSample(sample.id, scene, question, answer)


def demo_pair(sample: ExplainSample, seed: int = 0) -> ExplainSample | None:
    """The sample's MMVP-style partner (one detail changed, and with it the answer), or None."""
    from ..demo.samples import make_pair, to_explain_sample

    demo = demo_sample_from(sample)
    if demo is None:
        return None
    partner = make_pair(demo, seed)
    return to_explain_sample(partner) if partner is not None else None


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
    family's answer-flipping edit when it is a different scene."""
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
            raise ValueError(f"parameter rephrasings[{k}]={text!r} must be a non-empty question")
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
    id = "data.counterfactual"
    title = "Counterfactual edits: answer flips"
    family = FAMILY
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

    def unmet(self, model: LoadedModel, sample: ExplainSample, params: Params) -> str | None:
        if demo_sample_from(sample) is None and not params.rephrasings:
            return ("needs demo-world ground truth (the scene's objects and the question family) to edit the "
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
    "demo_pair",
    "demo_sample_from",
    "forced_prob",
    "joint_prob",
    "parse_question",
    "rephrase_edits",
]
