"""Benchmarks over a sample set: POPE-style object probing (Li et al., arXiv 2305.10355).

For every image, the model is asked yes/no questions about objects that are in it (from the
ground truth, ``extra["objects"]``) and as many that are not, drawn three ways: *random*
absent objects, the *popular* ones (most frequent in the set) and *adversarial* ones that share
a colour or a shape with an object in the image. Every answer is the model's own greedy answer
(:func:`xmllm.explainers.answering.generate_answer`), recorded with its question; the metrics are
computed from those records alone, so a reader can recount them.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from xmllm import MissingInput

from ..answering import generate_answer, normalise
from xmllm.explainers.prepared import ExplainSample
from ..demo.questions import Presence
from ..explanation import Explanation, Target
from ..models import LoadedModel
from ..params import ExplainerParams, ParamError, param
from ..registry import Citation, Explainer, Need, register

GROUP = "benchmark"
SETTINGS: tuple[str, ...] = ("random", "popular", "adversarial")
METRICS: tuple[str, ...] = ("accuracy", "precision", "recall", "f1", "yes_ratio", "other_ratio")
TRUTHS: tuple[str, ...] = ("yes", "no")
PREDICTIONS: tuple[str, ...] = ("yes", "no", "other")
DEFAULT_TEMPLATE = Presence.templates[0]
"""``Is there a {colour} {shape}?``: the demo world's own presence question, first wording."""
DEFAULT_PER_IMAGE = 3
"""Objects asked about per image and setting, present and absent each (POPE asks three of each)."""
NEGATIVE_WORDS = frozenset({"no", "not"})
"""Words that make an answer a "no" (POPE's own parsing looks for the same two)."""

POPE = Citation("Evaluating Object Hallucination in Large Vision-Language Models", 2023, "2305.10355",
                "Li, Du, Zhou, Wang, Zhao, Wen")


def parse_yes_no(answer: str) -> str:
    """``yes``, ``no`` or ``other``: "no"/"not" anywhere makes a no (as POPE parses), else "yes"
    anywhere a yes; an answer with neither is ``other``, counted as neither (POPE would call it yes)."""
    words = set(normalise(answer).split())
    if words & NEGATIVE_WORDS:
        return "no"
    if "yes" in words:
        return "yes"
    return "other"


@dataclass(frozen=True)
class ObjectQuestion:
    """One question of the benchmark: an object asked about in one sample's image."""

    sample: int
    colour: str
    shape: str
    truth: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def object_keys(sample: ExplainSample, explainer: str) -> list[tuple[str, str]]:
    """The (colour, shape) of every ground-truth object of a sample, in order, duplicates kept."""
    objects = sample.extra.get("objects") if isinstance(sample.extra, Mapping) else None
    if not isinstance(objects, list):
        raise MissingInput(f"{explainer}: sample {sample.id!r} has no extra['objects'] list "
                           "(ground-truth objects needed)")
    keys = []
    for k, obj in enumerate(objects):
        if not isinstance(obj, Mapping) or not all(isinstance(obj.get(k), str) for k in ("colour", "shape")):
            raise MissingInput(f"{explainer}: sample {sample.id!r}: objects[{k}] needs string 'colour' and 'shape'")
        keys.append((obj["colour"], obj["shape"]))
    return keys


def negatives(setting: str, present: set[tuple[str, str]], universe: Sequence[tuple[str, str]],
              frequency: Mapping[tuple[str, str], int], count: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """``count`` objects absent from the image, chosen the ``setting``'s way (fewer if there are not
    enough): random from the set's objects; popular, most frequent first; adversarial, sharing
    a colour or a shape with a present object, those sharing both first, then by frequency."""
    absent = [key for key in universe if key not in present]
    if setting == "random":
        if len(absent) <= count:
            return absent
        return [absent[i] for i in sorted(rng.choice(len(absent), size=count, replace=False).tolist())]
    if setting == "popular":
        return sorted(absent, key=lambda k: (-frequency[k], k))[:count]
    colours = {c for c, _ in present}
    shapes = {s for _, s in present}
    shared = {k: (k[0] in colours) + (k[1] in shapes) for k in absent}
    return sorted((k for k in absent if shared[k]), key=lambda k: (-shared[k], -frequency[k], k))[:count]


def build_questions(keys: Sequence[Sequence[tuple[str, str]]], settings: Sequence[str], per_image: int,
                    seed: int) -> dict[str, list[ObjectQuestion]]:
    """Per setting, the questions of every image: up to ``per_image`` present objects (the same in
    every setting) and as many absent ones. The universe is every object seen in the set, and an
    object's frequency is the number of images that hold it."""
    frequency: Counter[tuple[str, str]] = Counter()
    for image in keys:
        frequency.update(set(image))
    universe = sorted(frequency)
    out: dict[str, list[ObjectQuestion]] = {s: [] for s in settings}
    for index, image in enumerate(keys):
        present = set(image)
        distinct = sorted(present)
        rng = np.random.default_rng([seed, index])
        if len(distinct) > per_image:
            distinct = [distinct[i] for i in sorted(rng.choice(len(distinct), size=per_image, replace=False).tolist())]
        positives = [ObjectQuestion(index, c, s, "yes") for c, s in distinct]
        for setting in settings:
            setting_rng = np.random.default_rng([seed, index, SETTINGS.index(setting)])
            absent = negatives(setting, present, universe, frequency, len(positives) or per_image, setting_rng)
            out[setting].extend(positives + [ObjectQuestion(index, c, s, "no") for c, s in absent])
    return out


def pope_metrics(truths: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of "yes" as the positive class, and the yes and other
    ratios. An ``other`` answer is wrong whatever the truth; an undefined ratio is 0."""
    n = len(truths)
    if n == 0:
        return {m: 0.0 for m in METRICS}
    tp = sum(t == "yes" and p == "yes" for t, p in zip(truths, predictions))
    said_yes = sum(p == "yes" for p in predictions)
    are_yes = sum(t == "yes" for t in truths)
    correct = sum(t == p for t, p in zip(truths, predictions))
    precision = tp / said_yes if said_yes else 0.0
    recall = tp / are_yes if are_yes else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": correct / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": said_yes / n,
        "other_ratio": sum(p == "other" for p in predictions) / n,
    }


@register
class PopeBenchmark(Explainer):
    """POPE over a labelled sample set: yes/no questions about objects in each image and as many absent
    ones (drawn at random, from the most frequent, or sharing a colour or shape), scored from the
    model's own greedy answers: accuracy, precision, recall, F1 and yes-ratio per setting.

    Cost: one greedy generation per distinct question (up to 2 x per_image x settings per image,
    present objects shared by the settings), no backward. POPE, 2023 (arXiv 2305.10355).
    """

    id = "benchmark.pope"
    title = "POPE: yes/no object probing with random, popular and adversarial negatives"
    group = GROUP
    scope = "dataset"
    needs = frozenset({Need.LABELLED_SET})
    citations = (POPE,)
    summary = (
        "Asks the model, for each image, whether objects are present: up to three that are and as "
        "many that are not, drawn at random, from the set's most frequent objects, or sharing a "
        "colour or shape with an object in the image (POPE's random, popular and adversarial "
        "settings). Accuracy, precision, recall, F1 and yes-ratio per setting from the model's own "
        "greedy answers, each recorded."
    )

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        settings: tuple[str, ...] = param(SETTINGS, "how absent objects are drawn (at least one)", choices=SETTINGS)
        per_image: int = param(DEFAULT_PER_IMAGE, "present objects asked about per image, and as many absent", low=1)
        seed: int = param(0, "seed of the objects drawn per image")
        template: str = param(DEFAULT_TEMPLATE, "the question, with the fields {colour} and {shape}")
        max_new_tokens: int | None = param(None, "answer length limit (null: the model's generation config)", low=1)

    def compute(self, model: LoadedModel, samples: Sequence[ExplainSample], params: Params) -> Explanation:
        if not params.settings:
            raise ParamError(f"{self.id}: parameter settings=[] must name at least one of {', '.join(SETTINGS)}")
        settings = list(dict.fromkeys(params.settings))
        per_image, seed, max_new_tokens = params.per_image, params.seed, params.max_new_tokens
        template = self._template(params.template)
        samples = list(samples) if isinstance(samples, Sequence) and not isinstance(samples, str) else None
        if not samples or not all(isinstance(s, ExplainSample) for s in samples):
            raise MissingInput(f"{self.id} is dataset-scope: pass a non-empty list of samples")
        keys = [object_keys(s, self.id) for s in samples]
        questions = build_questions(keys, settings, per_image, seed)

        records: list[dict[str, Any]] = []
        index_of: dict[tuple[int, str, str], int] = {}
        per_setting: dict[str, list[int]] = {}
        for setting in settings:
            rows = []
            for asked in questions[setting]:
                key = (asked.sample, asked.colour, asked.shape)
                if key not in index_of:
                    s = samples[asked.sample]
                    question = template.format(colour=asked.colour, shape=asked.shape)
                    answer = generate_answer(model, s.images, question, max_new_tokens)
                    index_of[key] = len(records)
                    records.append({"sample": s.id, "object": asked.name, "question": question,
                                    "truth": asked.truth, "answer": answer.text,
                                    "prediction": parse_yes_no(answer.text), "settings": []})
                records[index_of[key]]["settings"].append(setting)
                rows.append(index_of[key])
            per_setting[setting] = rows

        table = np.zeros((len(settings), len(METRICS)))
        confusion = np.zeros((len(settings), len(TRUTHS), len(PREDICTIONS)))
        scores: dict[str, float] = {}
        for i, setting in enumerate(settings):
            chosen = [records[r] for r in per_setting[setting]]
            values = pope_metrics([r["truth"] for r in chosen], [r["prediction"] for r in chosen])
            table[i] = [values[m] for m in METRICS]
            for r in chosen:
                confusion[i, TRUTHS.index(r["truth"]), PREDICTIONS.index(r["prediction"])] += 1
            scores.update({f"{setting}.{m}": v for m, v in values.items()})
            scores[f"{setting}.questions"] = float(len(chosen))
        scores["answers_generated"] = float(len(records))
        exp = Explanation(
            self.id,
            {**params.as_dict(), "settings": list(settings)},
            Target(text="", token_ids=[], tokens=[], positions=[], probs=[]),
            scores=scores,
            meta={
                "settings": list(settings),
                "metrics": list(METRICS),
                "truths": list(TRUTHS),
                "predictions": list(PREDICTIONS),
                "answers": records,
                "questions": per_setting,
                "samples": len(samples),
                "universe": [f"{c} {s}" for c, s in sorted({k for image in keys for k in image})],
                "parsing": "an answer with the word 'no' or 'not' is no, else one with 'yes' is yes, else other; "
                           "other counts as wrong and as not-yes",
                "negatives": "random: absent objects of the set drawn by the seed; popular: the absent objects "
                             "held by the most images; adversarial: absent objects sharing a colour or shape with "
                             "one in the image (both first), then by frequency",
                "undefined": "precision (recall) is 0 when nothing is answered (truly) yes",
                "model_type": model.adapter.model_type,
            },
        )
        exp.add("metrics", table, ("setting", "metric"))
        exp.add("confusion", confusion, ("setting", "truth", "prediction"))
        return exp

    @staticmethod
    def _template(template: str) -> str:
        """The template, checked to use {colour} and {shape} and no other field."""
        try:
            filled = template.format(colour="red", shape="circle")
        except (KeyError, IndexError, ValueError):
            raise ParamError(f"parameter template={template!r} may only use the fields {{colour}} and "
                             "{shape}") from None
        if "red" not in filled or "circle" not in filled:
            raise ParamError(f"parameter template={template!r} must use both {{colour}} and {{shape}}")
        return template
