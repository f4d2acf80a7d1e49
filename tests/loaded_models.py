"""Models wrapped as a user gets them (``LoadedModel``), shared by the explainer tests: tiny random
models of every family, built once per session, and the random demo architecture saved and loaded
through ``load_model`` like a user's folder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import TEST_IMAGE_SIZES, build_tiny, missing_dependency, tiny_image

from xmllm.explainers.answering import generate_answer
from xmllm.explainers.prepared import ExplainSample, Prepared, prepare
from xmllm.explainers.demo.samples import generate_samples
from xmllm.explainers.models import LoadedModel, adapter_for, load_model

TINY_QUESTION = "what colour is the square"
"""What the tests ask the tiny models."""

_TINY: dict[str, LoadedModel] = {}


def tiny_loaded(family: str) -> LoadedModel:
    """The tiny random model of ``family`` (skips when its processor needs a missing package)."""
    package = missing_dependency(family)
    if package:
        pytest.skip(f"the {family} processor needs {package}, which is not installed")
    if family not in _TINY:
        model, processor = build_tiny(family)
        _TINY[family] = LoadedModel(model, processor, adapter_for(model, processor), f"tiny-{family}", "tests",
                                    torch.device("cpu"), torch.float32)
    return _TINY[family]


def tiny_prepared(family: str, question: str, tokens: int = 3, seed: int | None = None) -> Prepared:
    """The tiny model's own greedy answer of ``tokens`` tokens to ``question`` on a test image."""
    loaded = tiny_loaded(family)
    size = TEST_IMAGE_SIZES[family]
    image = tiny_image(*size) if seed is None else tiny_image(*size, seed=seed)
    answer = generate_answer(loaded, [image], question, max_new_tokens=tokens)
    suffix = "" if seed is None else f"-{seed}"
    return prepare(loaded, ExplainSample([image], question, id=f"tiny-{family}{suffix}"), answer=answer)


def random_demo_loaded(folder: Path, **load_options) -> LoadedModel:
    """The demo architecture with random weights (real LLaVA code), saved into ``folder`` and
    loaded back through ``load_model`` on the CPU in float32."""
    from random_demo import save_random_demo

    return load_model(save_random_demo(folder), device="cpu", dtype="float32", **load_options)


def random_demo_folder(root: Path, seed: int) -> Path:
    """The demo architecture with random weights (``seed``), saved as a user's folder would be."""
    from xmllm.explainers.demo.model import build_model, build_processor

    folder = root / f"demo-random-{seed}"
    if not (folder / "config.json").is_file():
        processor = build_processor(pictures=False)  # the single-image vocabulary: the random weights the suite was written against
        build_model(processor.tokenizer, seed=seed).save_pretrained(folder)
        processor.save_pretrained(folder)
    return folder


def demo_prepared(loaded: LoadedModel, index: int = 0, question_type: str | None = None) -> Prepared:
    """Demo sample ``index`` (seed 0, of ``question_type`` when given), with the model's own answer."""
    sample = generate_samples(index + 1, 0, question_types=[question_type] if question_type else None)[index]
    return prepare(loaded, ExplainSample([sample.image()], sample.text, id=sample.id))


def black_pixel(loaded: LoadedModel) -> torch.Tensor:
    """A black pixel after the processor's rescale and normalisation, per channel."""
    proc = loaded.processor.image_processor
    mean, std = torch.tensor(proc.image_mean), torch.tensor(proc.image_std)
    return (0.0 - mean) / std


def occlude_by_hand(prep: Prepared, cells: list[tuple[int, int]]) -> torch.Tensor:
    """pixel_values with each cell's patch-size square set to black, from the config's patch size."""
    patch = int(prep.model.config.vision_config.patch_size)
    pixels = prep.inputs["pixel_values"].clone()
    black = black_pixel(prep.loaded).to(pixels)
    for r, c in cells:
        pixels[:, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = black[:, None, None]
    return pixels


def answer_probability(loaded: LoadedModel, prepared: Prepared, pixels: torch.Tensor) -> float:
    """p(answer) with ``pixels`` in place of the image, by one plain forward and float64 sums: the
    reference the faithfulness curves are checked against, computed without their code."""
    with torch.no_grad():
        logits = loaded.model(**{**dict(prepared.inputs), "pixel_values": pixels}).logits
    logp = torch.log_softmax(logits[0, prepared.logit_positions].double(), dim=-1)
    ids = torch.tensor(prepared.answer.token_ids)
    return float(logp[torch.arange(len(ids)), ids].sum().exp())
