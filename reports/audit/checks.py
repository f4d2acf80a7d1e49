"""Hallucination checks run on each sample, registered by name (``checks:`` in the config).

``blank_image``: the model answers the same question about a blank image (the image's mean
colour everywhere, as ``inference.visual_reliance`` blanks it); an unchanged answer says the
answer did not come from the picture.

``pope``: POPE-style (Li et al. 2023) yes/no questions about one object that is in the image
and one that is not, from the sample's ground-truth ``objects`` (the demo world's); "yes" to
the absent one is a hallucinated object. Samples without ground-truth objects are skipped.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.prepared import Prepared


def blank_image(prepared: Prepared, seed: int) -> dict[str, Any]:
    from xmllm.explainers.answering import generate_answer, normalise
    from xmllm.explainers.masking import baseline_images

    blanks = baseline_images(prepared.sample.images, "mean", seed, 0.0)
    got = generate_answer(prepared.loaded, blanks, prepared.sample.question)
    same = normalise(got.text) == normalise(prepared.answer.text)
    return {"answer": got.text, "unchanged": same, "flip": not same}


def pope(prepared: Prepared, seed: int) -> dict[str, Any]:
    from xmllm.explainers.answering import generate_answer
    from xmllm.explainers.demo.world import COLOURS, SHAPES
    from xmllm.explainers.methods.benchmark import DEFAULT_TEMPLATE, object_keys, parse_yes_no

    sample = prepared.sample
    try:
        present = sorted(set(object_keys(sample, "pope check")))
    except ValueError:
        return {"skipped": "no ground-truth objects (extra['objects'] with colour and shape)"}
    universe = [(c, s) for c in COLOURS for s in SHAPES]
    absent = [k for k in universe if k not in set(present)]
    if not present or not absent:
        return {"skipped": "no present or no absent object to ask about"}
    rng = np.random.default_rng([seed, int.from_bytes(sample.id.encode("utf-8")[:8].ljust(8, b"\0"), "little")])
    asked = {"present": present[int(rng.integers(len(present)))], "absent": absent[int(rng.integers(len(absent)))]}
    out: dict[str, Any] = {}
    for truth, (colour, shape) in asked.items():
        question = DEFAULT_TEMPLATE.format(colour=colour, shape=shape)
        answer = generate_answer(prepared.loaded, sample.images, question).text
        out[truth] = {"question": question, "answer": answer, "parsed": parse_yes_no(answer)}
    out["hallucination"] = out["absent"]["parsed"] == "yes"
    out["missed"] = out["present"]["parsed"] != "yes"
    return out


CHECKS: dict[str, Callable[[Prepared, int], dict[str, Any]]] = {
    "blank_image": blank_image,
    "pope": pope,
}
