"""The default example of a dataset-scope explainer: a labelled demo sample set with MMVP pairs.

The run folder has the same two files as a sample run: ``explanations.npz`` and ``manifest.json``,
whose ``samples`` list (id, question, expected answer, hash) replaces a sample run's ``sample``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import ExampleRun, example_builder

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.prepared import ExplainSample
    from xmllm.explainers.registry import Explainer

    from ..session import ModelSession

DATASET_SEED = 7
DATASET_SCENES = 16
"""Scenes drawn for the set; with their MMVP partners the set holds up to twice as many samples."""


def example_set() -> "list[ExplainSample]":
    from xmllm.explainers.demo.samples import generate_samples, make_pair, to_explain_sample

    out = []
    for s in generate_samples(DATASET_SCENES, DATASET_SEED):
        partner = make_pair(s, DATASET_SEED)
        out += [s, partner] if partner is not None else [s]
    return [to_explain_sample(s) for s in out]


def set_hash(samples: "list[ExplainSample]") -> str:
    from ..session import sample_hash

    digest = hashlib.sha256()
    for s in samples:
        digest.update(sample_hash(s).encode())
    return digest.hexdigest()


@example_builder("dataset")
def dataset_example(session: "ModelSession", cls: "type[Explainer]") -> ExampleRun:
    samples = example_set()

    def build(folder: Path) -> None:
        from xmllm.explainers.explanation import save_explanations

        from ..pipeline import make_plan, run_plan
        from ..provenance import package_versions, utc_now
        from ..session import sample_hash

        loaded = session.loaded()
        plan = make_plan([cls.id], seed=session.seed)
        started = utc_now()
        outcome = next(run_plan(loaded, samples, plan, plan.skipped(loaded, samples)))
        explanation, seconds = outcome.explanation, outcome.wall
        explanation.meta.setdefault("seconds", seconds)
        manifest: dict[str, Any] = {
            "created": started,
            "seed": session.seed,
            "scope": "dataset",
            "model": loaded.provenance(),
            "samples": [{"id": s.id, "question": s.question, "expected": s.expected, "sha256": sample_hash(s)}
                        for s in samples],
            "explainers": [cls.id],
            "params": {cls.id: {}},
            "timings_seconds": {cls.id: round(seconds, 4)},
            "versions": package_versions(),
        }
        save_explanations([explanation], folder / "explanations.npz", folder / "manifest.json", extra=manifest)

    folder, cached = session.cached(set_hash(samples), cls.id, None, build)
    return ExampleRun(folder, cached)
