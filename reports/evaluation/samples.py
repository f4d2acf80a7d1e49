"""The samples an evaluation runs on: object-grounded demo questions, or a JSONL sample set."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from xmllm.errors import XmllmError

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.prepared import ExplainSample

MAX_DRAWS_PER_SAMPLE = 4
"""Demo draws tried per grounded question wanted: about 70% of questions are grounded, so
running out means something is wrong with the world, not bad luck."""


def demo_samples(n: int, seed: int, pictures: bool = False) -> "list[ExplainSample]":
    """The first ``n`` object-grounded demo questions of ``seed``: those whose answer depends on
    objects in the image (colour, shape, count above zero, presence answered yes, position). With
    ``pictures``: questions over two pictures or a clip's frames whose evidence is in exactly one
    picture (which picture, which frame, a count whose objects are all in one picture); the mask is
    that picture's and ``extra["evidence_image"]`` names it."""
    from xmllm.explainers.demo.samples import PICTURE_TYPE_NAMES, generate_sample, to_explain_sample

    flag = "--demo-pictures" if pictures else "--demo"
    if n <= 0:
        raise XmllmError(f"{flag} must be a positive number of samples, got {n}")
    out = []
    for index in range(n * MAX_DRAWS_PER_SAMPLE):
        sample = generate_sample(seed, index, PICTURE_TYPE_NAMES[index % len(PICTURE_TYPE_NAMES)] if pictures else None)
        if (sample.evidence_image is not None) if pictures else bool(sample.grounding):
            out.append(to_explain_sample(sample))
            if len(out) == n:
                return out
    raise XmllmError(f"{flag} {n}: only {len(out)} grounded questions in {n * MAX_DRAWS_PER_SAMPLE} draws of seed {seed}")


def jsonl_samples(path: Path) -> "list[ExplainSample]":
    """Every sample of a JSONL sample set, its mask (if any) checked against its image."""
    from xmllm.explainers.prepared import ExplainSample
    from xmllm.samples import read_sample_set

    out = []
    for record in read_sample_set(path):
        pictures = record.load_pictures()
        evidence = int(record.extra.get("evidence_image") or 1)
        if evidence > len(pictures):
            raise XmllmError(f"{path}: sample {record.id!r}: evidence_image {evidence} but {len(pictures)} pictures")
        image = pictures[evidence - 1]
        mask = record.load_mask()  # the evidence picture's: the cell metrics score that picture's grid
        if mask is not None and mask.shape != (image.height, image.width):
            raise XmllmError(f"{path}: sample {record.id!r}: mask {record.mask} is {mask.shape[1]}x{mask.shape[0]} "
                             f"pixels but its image is {image.width}x{image.height}")
        extra = dict(record.extra)
        if record.question_type:
            extra["question_type"] = record.question_type
        if record.pair:
            extra["pair"] = record.pair
        out.append(ExplainSample(pictures, record.question, id=record.id, expected=record.answer,
                                 mask=None if mask is None else np.asarray(mask, dtype=bool), extra=extra))
    return out
