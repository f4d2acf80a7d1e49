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


def demo_samples(n: int, seed: int) -> "list[ExplainSample]":
    """The first ``n`` object-grounded demo questions of ``seed``: those whose answer depends on
    objects in the image (colour, shape, count above zero, presence answered yes, position)."""
    from xmllm.explainers.demo.samples import generate_sample, to_explain_sample

    if n <= 0:
        raise XmllmError(f"--demo must be a positive number of samples, got {n}")
    out = []
    for index in range(n * MAX_DRAWS_PER_SAMPLE):
        sample = generate_sample(seed, index)
        if sample.grounding:
            out.append(to_explain_sample(sample))
            if len(out) == n:
                return out
    raise XmllmError(f"--demo {n}: only {len(out)} grounded questions in {n * MAX_DRAWS_PER_SAMPLE} draws of seed {seed}")


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
        mask = record.load_mask()  # the evidence picture's; the cell metrics score the first picture's grid
        if mask is not None and mask.shape != (image.height, image.width):
            raise XmllmError(f"{path}: sample {record.id!r}: mask {record.mask} is {mask.shape[1]}x{mask.shape[0]} "
                             f"pixels but its image is {image.width}x{image.height}")
        if evidence != 1:
            mask = None
        extra = dict(record.extra)
        if record.question_type:
            extra["question_type"] = record.question_type
        if record.pair:
            extra["pair"] = record.pair
        out.append(ExplainSample(pictures, record.question, id=record.id, expected=record.answer,
                                 mask=None if mask is None else np.asarray(mask, dtype=bool), extra=extra))
    return out
