"""Demo samples back from their ground truth: the scene and question an ``ExplainSample`` carries in
``extra`` (``question_type``, ``objects``), rebuilt as the demo world's own objects.

Explainers that edit a demo sample (its counterfactual edits, its MMVP-style partner for a
corrupted run) start from here, so every one rebuilds the sample the same way.
"""
from __future__ import annotations

import re

from xmllm import MissingInput

from xmllm.explainers.prepared import ExplainSample
from .pictures import Pictures
from .questions import ALL_QUESTION_TYPES, Question
from .samples import DemoSample, make_pair, to_explain_sample
from .world import COLOURS, IMAGE_SIZE, SHAPES, Scene


def _slot_values() -> dict[str, list[str]]:
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


def parse_question(question_type: str, text: str) -> Question:
    """The demo :class:`~xmllm.explainers.demo.questions.Question` whose wording is ``text``; a
    :class:`~xmllm.MissingInput` when the sample's question type or wording is not the demo world's."""
    kind = ALL_QUESTION_TYPES.get(question_type)
    if kind is None:
        raise MissingInput(f"extra['question_type']={question_type!r} is not a demo question type "
                           f"({', '.join(ALL_QUESTION_TYPES)})")
    variants = getattr(kind, "by_kind", {"": kind.templates})
    for templates in variants.values():
        for index, template in enumerate(templates):
            found = _template_pattern(template).fullmatch(text.strip())
            if found is None:
                continue
            question = Question(question_type, index, tuple(sorted(found.groupdict().items())))
            if question.text() == text.strip():
                return question
    raise MissingInput(f"question {text!r} is not one of the wordings of the demo question type {question_type!r}")


def demo_sample_from(sample: ExplainSample) -> DemoSample | None:
    """The demo-world sample behind ``sample`` (scene and question rebuilt from ``extra``), or
    None when ``extra`` carries no demo ground truth."""
    extra = sample.extra or {}
    if "objects" not in extra or "question_type" not in extra:
        return None
    objects = list(extra["objects"])
    try:  # several pictures: one list of objects per picture
        several = bool(objects) and all(isinstance(o, list) for o in objects)
        scene = Pictures.from_json(objects, IMAGE_SIZE) if several else Scene.from_json(objects, IMAGE_SIZE)
    except (TypeError, ValueError) as error:
        raise MissingInput(f"sample {sample.id!r}: extra['objects'] is not a list of demo objects ({error})") from None
    question = parse_question(str(extra["question_type"]), sample.question)
    answer = sample.expected if sample.expected is not None else question.answer(scene)
    if answer is None:
        raise MissingInput(f"sample {sample.id!r}: the question has no single answer on the scene in extra['objects']")
    return DemoSample(sample.id, scene, question, answer)


def demo_pair(sample: ExplainSample, seed: int = 0) -> ExplainSample | None:
    """The sample's MMVP-style partner (one detail changed, and with it the answer), or None."""
    demo = demo_sample_from(sample)
    if demo is None:
        return None
    partner = make_pair(demo, seed)
    return to_explain_sample(partner) if partner is not None else None


__all__ = ["demo_pair", "demo_sample_from", "parse_question"]
