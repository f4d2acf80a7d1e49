"""Batched occlusion against Captum's FeatureAblation, one perturbation per forward.

Both sides occlude the same cells (non-overlapping ``k x k`` windows of the main grid: Captum's
``feature_mask`` groups each window's pixels through the adapter's ``pixel_cell_map``) with the
same baseline (the processed black image) and score the same target (the sum of the answer
tokens' log-probabilities, through the same scoring function), on the demo model and on the
576-image-token LLaVA-shaped model with a 32-token answer. Measured side by side, interleaved:

* Captum on the model as loaded (the benchmark loads it with eager attention, as the attention
  explainers need) over ``perturbation.occlusion`` with its defaults (batched, fused attention
  kernel): target ``>= 3``;
* the same with Captum also on the fused kernel, so that batching alone is measured (no target:
  on a CPU batching gains little once the matrices are large; on a GPU it is most of the gain).

Each row reports the largest absolute difference between the two whole-answer maps.
"""
from __future__ import annotations

import gc
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from explainers.context import ExplainSample, Prepared, prepare
from explainers.methods.perturbation import (
    Occlusion,
    answer_ids,
    baseline_pixels,
    batch_size_for,
    cell_map,
    first_layout,
    fused_attention,
    logprobs_at,
    windows,
)

from . import BenchContext, BenchRow
from .models import ANSWER_TOKENS, ANSWER_WORDS, LARGE, LONG_QUESTION, QUICK_ANSWER_TOKENS, large_model

GROUP = "perturbation.occlusion"
TARGET = ">= 3"
BASELINE = "black"
SAMPLE_SEED = 0
DEMO_WINDOW = 1
"""Every cell of the demo model's grid."""
LARGE_WINDOW = 4
QUICK_LARGE_WINDOW = 6
"""Windows on the 576-token model (36 or 16 of them): Captum's single forwards there take most
of the case's time budget."""


# --- models and samples -------------------------------------------------------------------------------


def _forced(loaded: Any, question: str, tokens: int) -> Prepared:
    """The final sequence with an answer of exactly ``tokens`` tokens (a random model's own answer
    could stop early); the cost does not depend on which words."""
    from explainers.answering import Answer
    from explainers.demo.samples import generate_sample

    text = " ".join([ANSWER_WORDS] * (tokens // len(ANSWER_WORDS.split()) + 1))
    ids = loaded.adapter.tokenize_answer(text)[:tokens]
    tokenizer = loaded.processor.tokenizer
    answer = Answer(tokenizer.decode(ids), tuple(ids), tuple(tokenizer.convert_ids_to_tokens(ids)),
                    tuple(0.0 for _ in ids))
    image = generate_sample(SAMPLE_SEED, 0).image()
    return prepare(loaded, ExplainSample([image], question), answer=answer)


def _demo(loaded: Any) -> Prepared:
    from explainers.demo.samples import generate_sample

    sample = generate_sample(SAMPLE_SEED, 0)
    return prepare(loaded, ExplainSample([sample.image()], sample.text, id=sample.id))


# --- the two ways ---------------------------------------------------------------------------------------


def ours(prep: Prepared, window: int) -> torch.Tensor:
    exp = Occlusion().explain(prep.loaded, prep, window=window, stride=window, baseline=BASELINE, views="main")
    return torch.as_tensor(exp.maps["image.answer"])


def feature_mask(prep: Prepared, window: int) -> torch.Tensor:
    """Captum's grouping: each pixel value gets the index of the window whose cell covers it."""
    mapping = cell_map(prep)
    mask = torch.full(mapping.shape, -1, dtype=torch.long, device=mapping.device)
    for k, win in enumerate(windows(first_layout(prep), window, window, "main")):
        mask[torch.isin(mapping, win.positions.to(mapping.device))] = k
    if bool((mask < 0).any()):
        raise RuntimeError("some pixels feed no grid cell: Captum would ablate them as one more feature")
    return mask


def captum(prep: Prepared, window: int, fused: bool) -> torch.Tensor:
    """FeatureAblation over the windows, one perturbed forward at a time; back to a cell map."""
    from captum.attr import FeatureAblation

    inputs, ids = dict(prep.inputs), answer_ids(prep)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        return logprobs_at(prep.model, {**inputs, "pixel_values": pixels}, prep.logit_positions, ids).sum(dim=-1)

    mask = feature_mask(prep, window)
    base = baseline_pixels(prep, BASELINE)
    with fused_attention(prep.model, fused):
        attr = FeatureAblation(forward).attribute(inputs["pixel_values"], baselines=base, feature_mask=mask,
                                                  perturbations_per_eval=1)
    grid = first_layout(prep).main_grid
    mapping = cell_map(prep).flatten()
    flat = attr.detach().flatten()
    first_pixel = [int(torch.nonzero(mapping == p)[0]) for p in grid.positions.tolist()]
    return flat[first_pixel].reshape(grid.rows, grid.cols).double().cpu()


# --- measuring ------------------------------------------------------------------------------------------


def _interleaved(fns: dict[str, Callable[[], Any]], repeat: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Seconds per round of each function, run in turn (A B C A B C ...), and their last results."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, Any] = {}
    for _ in range(repeat):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return times, results


def _ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def _rows(label: str, prep: Prepared, window: int, repeat: int) -> list[BenchRow]:
    ours(prep, window)  # warm-up: first-call costs (kernel switch, allocator) on neither side's clock
    fns = {
        "ours": lambda: ours(prep, window),
        "captum_as_loaded": lambda: captum(prep, window, fused=False),
        "captum_fused": lambda: captum(prep, window, fused=True),
    }
    times, results = _interleaved(fns, repeat)
    grid = first_layout(prep).main_grid
    shape = {
        "cells": grid.size, "window": window, "features": len(windows(first_layout(prep), window, window, "main")),
        "answer_tokens": len(prep.answer.token_ids), "seq_len": prep.seq_len, "batch_size": batch_size_for(prep, None),
        "baseline": BASELINE, "repeat": repeat,
        **{f"seconds_{name}": statistics.median(t) for name, t in times.items()},
    }
    agree = {
        "max_abs_difference_as_loaded": float((results["ours"] - results["captum_as_loaded"]).abs().max()),
        "max_abs_difference_fused": float((results["ours"] - results["captum_fused"]).abs().max()),
        "map_max_abs": float(results["ours"].abs().max()),
    }
    return [
        BenchRow(GROUP, "speed-up: Captum FeatureAblation (1 per forward, model as loaded) / ours",
                 _ratio(times, "captum_as_loaded", "ours"), TARGET, label, {**shape, **agree}),
        BenchRow(GROUP, "speed-up: Captum FeatureAblation (1 per forward, same fused kernel) / ours",
                 _ratio(times, "captum_fused", "ours"), None, label, {**shape, **agree}),
    ]


def cases(ctx: BenchContext) -> list[BenchRow]:
    rows: list[BenchRow] = []
    if "demo" in ctx.models:
        rows += _rows("demo", _demo(ctx.models["demo"]), DEMO_WINDOW, repeat=max(ctx.repeat, 1))
    tokens = QUICK_ANSWER_TOKENS if ctx.quick else ANSWER_TOKENS
    window = QUICK_LARGE_WINDOW if ctx.quick else LARGE_WINDOW
    with tempfile.TemporaryDirectory(prefix="xmllm-bench-") as scratch:
        prepared = _forced(large_model(ctx, scratch), LONG_QUESTION, tokens)
        rows += _rows(LARGE, prepared, window, repeat=1)  # Captum's single forwards are long here
    return rows
