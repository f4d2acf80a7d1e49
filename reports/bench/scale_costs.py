"""``xmllm bench --scale --growth``: how each explainer's memory and cost grow with the answer and the image.

On one LLaVA-style configuration (LLaVA-1.5-7B by default) every sample-level explainer (and the
recomputed run of each one that differentiates) is measured and projected exactly as ``--scale``
does (:mod:`xmllm.bench.scale`: free arithmetic on a CPU, the decoder cut to a few blocks and
projected to the published depth, plus the weights), at five points on two axes:

* answer length: a forced answer of 32, 128 and 512 tokens, the image at its 576 tokens;
* image tokens: the CLIP tower's ``image_size`` (and the processor's resize and crop) set to 336,
  756 and 1,260 px, a 24 x 24, 54 x 54 and 90 x 90 patch grid: 576, 2,916 and 8,100 image tokens
  (the square grids nearest LLaVA-NeXT's 2,928 and 8,192; the position table grows with the grid,
  which adds 2 and 8 M parameters), the answer at 32 tokens.

A least-squares line through each axis's three points (:func:`xmllm.bench.scale.fit`, its residual
saying how bent the growth is: attention grows with the square of the sequence) gives, per
explainer, bytes and forward-equivalents per answer token and per image token; a 500-token
description is read off the answer-length line at 500 tokens (576 image tokens). To keep the run
short the decoder is measured at 2 and 4 blocks only (the two points the projection follows).

Free arithmetic still allocates what it counts: at 8,100 image tokens one layer's eager attention
softmax (32 heads x 8,150^2, in float32) is 8.5 GB, so the 1,260 px point needs a machine with
well over 16 GB of free memory (``image_sides`` of :func:`run_growth` takes smaller sides: 1,008 px
is 5,184 tokens).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from xmllm.explainers.registry import sample_level_ids

from .scale import (
    ANSWER_TOKENS,
    CUDA,
    FREE,
    GIB,
    RECOMPUTED,
    VISION_BASE,
    VISION_STEP,
    Model,
    describe,
    fit,
    measure_config,
    project,
    run_keys,
)
from .scale_configs import CONFIGS, ScaleConfig

GROWTH_FAMILIES: tuple[str, ...] = ("llava",)
"""Families whose image-token count the growth run sets through the vision tower's image size."""
ANSWER_LENGTHS: tuple[int, ...] = (32, 128, 512)
IMAGE_SIDES: tuple[int, ...] = (336, 756, 1260)
"""CLIP image sizes (px) giving 576, 2,916 and 8,100 image tokens at patch 14."""
GROWTH_DEPTHS: tuple[int, ...] = (2, 4)
DESCRIPTION_TOKENS = 500


def resized(config: ScaleConfig, side: int) -> ScaleConfig:
    """``config`` with its vision tower (and the processor's resize and crop) at ``side`` px: a square
    grid of ``(side / patch)^2`` image tokens."""
    if config.model_type not in GROWTH_FAMILIES:
        raise ValueError(f"growth resizes a LLaVA-style vision tower; {config.name} is {config.model_type}")
    grid = side // int(config.vision["patch_size"])
    return replace(config, name=f"{config.name}@{side}px", vision={**config.vision, "image_size": side},
                   processor={**config.processor, "size": {"shortest_edge": side},
                              "crop_size": {"height": side, "width": side}},
                   image_size=(side, side), image_tokens=grid * grid,
                   note=f"{config.note}; vision tower at {side} px: {grid} x {grid} = {grid * grid} image tokens")


def _point(model: Model, keys: Sequence[str], device: torch.device, answer: int,
           tell: Callable[[str], None] | None) -> dict[str, dict[str, Any]]:
    rows = measure_config(model, keys, device, GROWTH_DEPTHS, (VISION_BASE, VISION_STEP), tell,
                          answer_tokens=answer)
    return {row["key"]: row for row in rows}


def _line(points: list[tuple[float, float | None]]) -> dict[str, float] | None:
    if any(y is None or not math.isfinite(y) for _, y in points):
        return None
    return fit(points)


def run_growth(config: ScaleConfig | str = "llava-1.5-7b", only: str | None = None,
               device: torch.device | str = "cpu", tell: Callable[[str], None] | None = None, *,
               recompute: bool = True, answer_lengths: Sequence[int] = ANSWER_LENGTHS,
               image_sides: Sequence[int] = IMAGE_SIDES, ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Every run key's projected peak and forward-equivalents at each answer length (image at
    ``image_sides[0]``) and each image side (answer at ``answer_lengths[0]``), with one line per key
    and axis, and the cost of a :data:`DESCRIPTION_TOKENS`-token description."""
    start = time.perf_counter()
    device = torch.device(device)
    if isinstance(config, str):
        config = next(c for c in CONFIGS if c.name == config)
    eids = list(ids) if ids is not None else [eid for eid in sample_level_ids() if not only or only in eid]
    keys = run_keys(eids, recompute)
    base = resized(config, image_sides[0])
    models = {side: describe(resized(config, side)) for side in image_sides}
    for model in models.values():  # every point under the published model's GPU budget
        model.gpu, model.budget = models[image_sides[0]].gpu, models[image_sides[0]].budget
    by_answer = {n: _point(models[image_sides[0]], keys, device, n, tell) for n in answer_lengths}
    image_tokens = {image_sides[0]: base.image_tokens}
    by_image = {image_sides[0]: by_answer[answer_lengths[0]]}
    for side in image_sides[1:]:
        by_image[side] = _point(models[side], keys, device, answer_lengths[0], tell)
        image_tokens[side] = models[side].config.image_tokens
    lines = []
    for key in keys:
        answer_rows = [(n, by_answer[n][key]) for n in answer_lengths]
        image_rows = [(image_tokens[side], by_image[side][key]) for side in image_sides]
        line: dict[str, Any] = {"key": key, "explainer": answer_rows[0][1]["explainer"],
                                "run": answer_rows[0][1]["run"]}
        errors = sorted({r["error"] for _, r in answer_rows + image_rows if r.get("error")})
        if errors:
            line["error"] = errors[0]
        for axis, rows in (("answer", answer_rows), ("image", image_rows)):
            memory = [(x, r.get("projected_bytes")) for x, r in rows]
            cost = [(x, r["costs"].get("forward_equivalents")) for x, r in rows]
            line[axis] = {"x": [x for x, _ in rows], "projected_bytes": [y for _, y in memory],
                          "forward_equivalents": [y for _, y in cost],
                          "lower_bound": any(r["costs"].get("lower_bound") for _, r in rows),
                          "memory_fit": _line(memory), "cost_fit": _line(cost)}
        answer = line["answer"]
        if answer["memory_fit"] and answer["cost_fit"]:
            line["description"] = {"answer_tokens": DESCRIPTION_TOKENS, "image_tokens": base.image_tokens,
                                   "projected_bytes": project(answer["memory_fit"], DESCRIPTION_TOKENS),
                                   "forward_equivalents": project(answer["cost_fit"], DESCRIPTION_TOKENS),
                                   "lower_bound": answer["lower_bound"]}
        lines.append(line)
    first = models[image_sides[0]]
    return {"config": config.name, "source": config.source, "device": str(device),
            "method": CUDA if device.type == "cuda" else FREE, "depths": list(GROWTH_DEPTHS),
            "answer_lengths": list(answer_lengths), "image_sides": list(image_sides),
            "image_tokens": [image_tokens[s] for s in image_sides], "default_answer_tokens": ANSWER_TOKENS,
            "weights_bytes": first.weights, "gpu_budget_gib": first.gpu, "budget_bytes": first.budget,
            "lines": lines, "seconds": round(time.perf_counter() - start, 1)}


def _slope(fit_: dict[str, float] | None, scale: float, digits: int) -> str:
    return "-" if fit_ is None else f"{fit_['slope'] / scale:.{digits}f}"


def _bend(fit_: dict[str, float] | None, scale: float) -> str:
    return "-" if fit_ is None else f"{fit_['residual_max'] / scale:.2f}"


def render_growth(report: dict[str, Any]) -> str:
    """One line per run key: slopes in MiB and forward-equivalents per answer and per image token
    (with each memory line's largest residual), then the 500-token description's cost."""
    mib = 1 << 20
    head = (f"xmllm bench --scale --growth on {report['config']} ({report['source']}), {report['device']}: "
            f"{report['method']}; projected peak (weights + activations) and forward-equivalents, fitted "
            f"against answer length {report['answer_lengths']} (image {report['image_tokens'][0]} tokens) and "
            f"image tokens {report['image_tokens']} (answer {report['answer_lengths'][0]} tokens); decoder "
            f"measured at {report['depths']} blocks; {RECOMPUTED}: recompute=True")
    rows = []
    for line in report["lines"]:
        if line.get("error"):
            rows.append([line["key"], line["error"], "", "", "", "", "", ""])
            continue
        a, i, d = line["answer"], line["image"], line.get("description")
        rows.append([line["key"],
                     _slope(a["memory_fit"], mib, 2), _bend(a["memory_fit"], GIB), _slope(a["cost_fit"], 1, 3),
                     _slope(i["memory_fit"], mib, 2), _bend(i["memory_fit"], GIB), _slope(i["cost_fit"], 1, 4),
                     "-" if not d else f"{d['projected_bytes'] / GIB:.1f} GiB, "
                                       f"x{d['forward_equivalents']:.0f}{'+' if d['lower_bound'] else ''}"])
    from .scale import _table

    header = ["run", "MiB/answer tok", "bend GiB", "fwd-eq/answer tok", "MiB/image tok", "bend GiB",
              "fwd-eq/image tok", f"{DESCRIPTION_TOKENS}-token answer"]
    return "\n".join([head, "", _table(header, rows), "",
                      f"{len(report['lines'])} runs x 5 points in {report['seconds']:.0f} s"])


def description_table(report: dict[str, Any]) -> str:
    """The 500-token description's cost per explainer as a markdown table (GiB, forward-equivalents;
    the recomputed run beside the kept one where there is one)."""
    by = {line["key"]: line for line in report["lines"]}
    out = ["| explainer | peak GiB | forward-equivalents | recomputed: peak GiB | forward-equivalents |",
           "| --- | ---: | ---: | ---: | ---: |"]

    def cells(line: dict[str, Any] | None) -> list[str]:
        d = (line or {}).get("description")
        if not d:
            return ["", ""] if line is None else ["error", ""]
        return [f"{d['projected_bytes'] / GIB:.1f}", f"{d['forward_equivalents']:,.0f}{'+' if d['lower_bound'] else ''}"]

    for line in report["lines"]:
        if line["run"] != "default":
            continue
        out.append("| " + " | ".join([f"`{line['key']}`", *cells(line), *cells(by.get(line["key"] + RECOMPUTED))]) + " |")
    return "\n".join(out)
