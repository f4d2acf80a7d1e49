"""The default example of a sample-scope explainer: one fixed demo sample, default parameters."""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import ExampleRun, example_builder

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.prepared import ExplainSample
    from xmllm.explainers.registry import Explainer

    from ..session import ModelSession

EXAMPLE_SEED = 7
EXAMPLE_INDEX = 0
EXAMPLE_QUESTION_TYPE = "colour"
"""The sample every sample-scope example explains: sample 0 of seed 7, a colour question."""


def example_sample() -> "ExplainSample":
    from xmllm.explainers.demo.samples import generate_sample, to_explain_sample

    return to_explain_sample(generate_sample(EXAMPLE_SEED, EXAMPLE_INDEX, EXAMPLE_QUESTION_TYPE))


@example_builder("sample")
def sample_example(session: "ModelSession", cls: "type[Explainer]") -> ExampleRun:
    folder, cached = session.run(example_sample(), cls.id)
    return ExampleRun(folder, cached)
