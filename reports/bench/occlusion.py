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

Both sides run in one process under the allocator ``xmllm`` sets (:mod:`xmllm.allocator`).
Under glibc's default, Captum's eager forwards on the 576-token model page-faulted their attention
matrices afresh each call (7.4 s against 3.2 s kept), which had made ours look 4.2x faster there;
kept, the CPU ratio on that model is about 2x, and 1.2-1.3x of it on the same kernel: a forward of
that size fills the CPU at one copy, so batching pays only where single forwards leave the device
idle (the demo model here, any model on a GPU).
"""
from __future__ import annotations

from typing import Any

import torch

from xmllm.explainers.prepared import Prepared
from xmllm.explainers.methods.perturbation import Occlusion
from xmllm.explainers.forward import answer_ids, batch_size_for, fused_attention, logprobs_at
from xmllm.explainers.masking import baseline_pixels, cell_map, first_layout, windows

from . import BenchContext, BenchRow, interleaved
from .models import LARGE, LONG_QUESTION, MAIN, answer_tokens, forced_prepared, own_prepared

GROUP = Occlusion.id
"""The explainer this case compares with Captum's FeatureAblation."""
TARGET = ">= 3"
BASELINE = "black"
DEMO_WINDOW = 1
"""Every cell of the demo model's grid."""
LARGE_WINDOW = 4
QUICK_LARGE_WINDOW = 6
"""Windows on the 576-token model (36 or 16 of them): Captum's single forwards there take most
of the case's time budget."""


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


def _warm_up(prep: Prepared, window: int) -> None:
    """First calls off every side's clock: ours once, and one unperturbed forward with each
    attention kernel Captum runs (kernel switches, the allocator's first blocks of each size)."""
    ours(prep, window)
    ids = answer_ids(prep)
    with torch.inference_mode():
        for fused in (False, True):
            with fused_attention(prep.model, fused):
                logprobs_at(prep.model, dict(prep.inputs), prep.logit_positions, ids)


def _rows(label: str, prep: Prepared, window: int, repeat: int) -> list[BenchRow]:
    fns = {
        "ours": lambda: ours(prep, window),
        "captum_as_loaded": lambda: captum(prep, window, fused=False),
        "captum_fused": lambda: captum(prep, window, fused=True),
    }
    results: dict[str, Any] = {}
    _warm_up(prep, window)
    timings = interleaved(fns, repeat=repeat, warmup=0, kept=results)
    grid = first_layout(prep).main_grid
    shape = {
        "cells": grid.size, "window": window, "features": len(windows(first_layout(prep), window, window, "main")),
        "answer_tokens": len(prep.answer.token_ids), "seq_len": prep.seq_len, "batch_size": batch_size_for(prep, None),
        "baseline": BASELINE, "repeat": repeat, **timings.summary(),
    }
    agree = {
        "max_abs_difference_as_loaded": float((results["ours"] - results["captum_as_loaded"]).abs().max()),
        "max_abs_difference_fused": float((results["ours"] - results["captum_fused"]).abs().max()),
        "map_max_abs": float(results["ours"].abs().max()),
    }
    return [
        BenchRow(GROUP, "speed-up: Captum FeatureAblation (1 per forward, model as loaded) / ours",
                 timings.ratio("captum_as_loaded", "ours"), TARGET, label,
                 {**shape, **agree, "cpu_time_ratio": timings.cpu_ratio("captum_as_loaded", "ours")},
                 ours=timings.seconds("ours"), reference=timings.seconds("captum_as_loaded"), unit="s"),
        BenchRow(GROUP, "speed-up: Captum FeatureAblation (1 per forward, same fused kernel) / ours",
                 timings.ratio("captum_fused", "ours"), None, label,
                 {**shape, **agree, "cpu_time_ratio": timings.cpu_ratio("captum_fused", "ours")},
                 ours=timings.seconds("ours"), reference=timings.seconds("captum_fused"), unit="s"),
    ]


def cases(ctx: BenchContext) -> list[BenchRow]:
    rows: list[BenchRow] = []
    if MAIN in ctx.models:
        ctx.tell(f"{GROUP} on {MAIN}")
        repeat = 1 if ctx.quick else max(ctx.repeat, 1)
        rows += _rows(MAIN, own_prepared(ctx.models[MAIN]), DEMO_WINDOW, repeat=repeat)
    if LARGE in ctx.models:
        ctx.tell(f"{GROUP} on {LARGE}")
        prepared = forced_prepared(ctx.models[LARGE], LONG_QUESTION, answer_tokens(ctx))
        window = QUICK_LARGE_WINDOW if ctx.quick else LARGE_WINDOW
        # Captum's single forwards are long here (about 30 s a round): ``--repeat 1`` for a quick look.
        rows += _rows(LARGE, prepared, window, repeat=1 if ctx.quick else max(ctx.repeat, 1))
    return rows
