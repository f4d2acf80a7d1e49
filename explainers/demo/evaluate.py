"""Exact-match accuracy of a model on freshly generated demo samples, per question type."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING

from ..answering import generate_answer, is_correct
from .pictures import by_group
from .samples import generate_picture_samples, generate_samples

if TYPE_CHECKING:  # pragma: no cover
    from ..models import LoadedModel


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound near 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def evaluate(loaded: "LoadedModel", n: int, seed: int, progress: bool = True, pictures: int = 0) -> dict:
    """Answer ``n`` single-image samples and ``pictures`` samples over several pictures or a clip's
    frames (both of ``seed``) greedily; accuracy overall, per group and per question type."""
    from tqdm import tqdm

    hits: dict[str, list[bool]] = defaultdict(list)
    mistakes = []
    samples = generate_samples(n, seed) + generate_picture_samples(pictures, seed)
    for s in tqdm(samples, desc="evaluating", unit="sample", disable=not progress):
        got = generate_answer(loaded, s.images(), s.text).text
        ok = is_correct(got, s.answer)
        hits[s.question_type].append(ok)
        if not ok and len(mistakes) < 20:
            mistakes.append({"id": s.id, "question": s.text, "expected": s.answer, "got": got})
    every = [h for v in hits.values() for h in v]
    groups = by_group(hits)
    report = {
        "n": len(every),
        "seed": seed,
        "accuracy": sum(every) / len(every),
        "interval": wilson(sum(every), len(every)),
        "groups": {g: {"n": len(v), "accuracy": sum(v) / len(v), "interval": wilson(sum(v), len(v))}
                   for g, v in groups.items() if v},
        "question_types": {
            qtype: {"n": len(v), "accuracy": sum(v) / len(v), "interval": wilson(sum(v), len(v))}
            for qtype, v in sorted(hits.items())
        },
        "mistakes": mistakes,
    }
    return report
