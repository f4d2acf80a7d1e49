"""Real saved runs for the report tests: real explainers on a tiny random LLaVA.

The model never emits special tokens (``suppress_tokens``), so its greedy answer has exactly
:data:`ANSWER_TOKENS` tokens and the per-token views have something to choose between.
Usage from tests: ``from report_runs import make_run, HOSTILE``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import build_tiny, tiny_image

from xmllm.explainers.prepared import ExplainSample
from xmllm.explainers.models import LoadedModel, adapter_for
from xmllm.report.explained import Run
from xmllm.pipeline import make_plan
from xmllm.runner import run_explainers

HOSTILE = """what colour is <script>alert(1)</script>"'& the square"""
"""A question that breaks any page that does not escape it."""
ANSWER_TOKENS = 3
IMAGE_SIZE = (32, 32)
EXPLAINERS = (
    "attention.raw",  # image and prompt maps over answer token x layer x head
    "attention.summary",  # layer x head matrices, stacked
    "attention.rollout",  # per-token maps with '.answer' siblings
    "perturbation.occlusion",  # signed image maps and scores
    "perturbation.text_ablation",  # prompt maps with NaN for non-question tokens
    "relevancy.modality",  # a 'modality' axis labelled from meta
)


def tiny_llava() -> LoadedModel:
    model, processor = build_tiny("llava")
    model.generation_config.max_new_tokens = ANSWER_TOKENS
    model.generation_config.suppress_tokens = list(processor.tokenizer.all_special_ids)
    return LoadedModel(model, processor, adapter_for(model, processor), "tiny-llava", "tests",
                       torch.device("cpu"), torch.float32)


def make_run(out: Path, question: str = HOSTILE, ids: tuple[str, ...] = EXPLAINERS,
             expected: str | None = "red") -> Run:
    """Explain the tiny model's answer to ``question`` and save the run folder in ``out``."""
    sample = ExplainSample([tiny_image(*IMAGE_SIZE)], question, id="tiny-sample", expected=expected)
    result = run_explainers(tiny_llava(), sample, make_plan(list(ids), seed=0))
    result.save(out, report=False)
    return result
