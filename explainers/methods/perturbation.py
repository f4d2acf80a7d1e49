"""Perturbation explainers: occlude image cells or ablate question words, re-run the model, measure.

Every number here comes from a real, teacher-forced forward of the final sequence (prompt +
answer): one forward gives every answer token's log-probability at once, and many perturbed
copies share one batched forward (:mod:`xmllm.explainers.forward`). A cell is occluded in pixel
space through the adapter's ``pixel_cell_map`` (:mod:`xmllm.explainers.masking`), so the same
code serves every family, tiles and dynamic resolutions included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from xmllm import MissingInput

from ..citations import ZEILER_FERGUS
from xmllm.explainers.prepared import Prepared
from ..explanation import Explanation
from ..forward import (
    answer_ids,
    base_logprobs,
    batch_size_for,
    batched_logprobs,
    eager_unless_fused,
    fused_attention,
)
from ..masking import (
    TEXT_MODES,
    MaskingParams,
    PixelCells,
    baseline_pixels,
    blur_radius_for,
    cell_map,
    mapped_layouts,
    occluded_logprobs,
    question_positions,
    replacement_id,
    text_batches,
    windows,
)
from ..models import LoadedModel
from ..occlusion_scale import occlusion_scale
from ..params import ExplainerParams, param
from ..registry import Explainer, register
from ..scaleplan import ScalePlan, trials_for

GROUP = "perturbation"


SIGN_NOTE = "drop = log p(original input) - log p(perturbed input); positive means the part supported the answer"


@register
class Occlusion(Explainer):
    """The drop in every answer token's log-probability when each window of image cells is replaced
    by a baseline (a cell map per answer token and one for the whole answer).

    Cost: one forward per window (one per cell at the defaults) plus the unoccluded one, batched many
    copies per forward, no backward. Zeiler and Fergus, 2013 (arXiv 1311.2901).
    """

    id = "perturbation.occlusion"
    model_needs = frozenset({"pixel_cells"})  # a cell is occluded through the pixel map
    title = "Occlusion (batched)"
    group = GROUP
    supports_contrast = True
    citations = (ZEILER_FERGUS,)
    summary = (
        "Occlude each window of image cells with a baseline and measure the drop in every answer "
        "token's log-probability; many occluded copies per teacher-forced forward."
    )
    noise_hint = ("occlude larger windows (--param perturbation.occlusion.window=2) or explain a "
                  "contrast (--contrast OTHER): a confident answer hardly moves when one cell is hidden")

    @classmethod
    def scale_plan(cls, prep: Prepared, full_layers: int) -> ScalePlan:
        """Larger windows than one cell, as many as fill the measured batch: the peak is one forward's."""
        scale = occlusion_scale(prep)

        def at(params: dict[str, Any], batch: int) -> dict[str, Any]:
            return {"window": scale.window_for(batch), "batch_size": batch}

        return ScalePlan({}, f"larger windows than 1 (the peak is one forward's: {scale.copies} copies)",
                         scale.copies, trials_for(scale.copies), at, cost=scale.cost)

    @dataclass(frozen=True)
    class Params(MaskingParams):
        window: int = param(1, "side of the occluded square, in grid cells", low=1)
        stride: int | None = param(None, "step between windows, in cells (null: the window's side)", low=1)
        prefix_cache: bool = param(True, "share the unoccluded prefix's key/value cache between copies (checked)")
        logit_rows: bool = param(True, "run the last block's post-attention work on the logit rows only (checked)")

    def compute(self, model: LoadedModel, sample: Prepared, params: Params) -> Explanation:
        window, baseline, views, seed = params.window, params.baseline, params.views, params.seed
        stride = window if params.stride is None else params.stride
        prefix_cache, logit_rows, fast_attention = params.prefix_cache, params.logit_rows, params.fast_attention
        prep = sample
        batch_size = batch_size_for(prep, params.batch_size, eager=eager_unless_fused(prep, fast_attention))
        layouts = mapped_layouts(prep)  # every image (or video frame) with a grid, each on its own grid
        radius = blur_radius_for(prep, params.blur_radius)
        cells = PixelCells(cell_map(prep))
        base = baseline_pixels(prep, baseline, seed, radius)
        plans = [(layout, windows(layout, window, stride, views)) for layout in layouts]
        occluded = [w.positions for _, wins in plans for w in wins]
        if len(layouts) > 1:  # and each whole picture: which one the answer needs
            occluded += [layout.all_positions for layout in layouts]
        ids = answer_ids(prep)
        with fused_attention(prep.model, fast_attention):
            original = base_logprobs(prep)
            perturbed, shortcuts = occluded_logprobs(prep, base, cells, occluded, batch_size,
                                                     original, prefix_cache=prefix_cache, logit_rows=logit_rows)
        drops = original[None, :] - perturbed  # (windows [+ pictures], T)
        exp = Explanation(
            self.id,
            {"window": window, "stride": stride, "baseline": baseline, "batch_size": batch_size, "seed": seed,
             "blur_radius": radius if baseline == "blur" else None, "views": views,
             "fast_attention": fast_attention, "prefix_cache": prefix_cache, "logit_rows": logit_rows},
            prep.target(),
        )
        start, worst_drop, worst_at = 0, -float("inf"), None
        for layout, wins in plans:
            grid = layout.main_grid
            part = drops[start : start + len(wins)].double()
            start += len(wins)
            total = torch.zeros(len(ids), grid.rows, grid.cols, dtype=torch.float64)
            count = torch.zeros(grid.rows, grid.cols, dtype=torch.float64)
            for w, d in zip(wins, part):
                total[:, w.rows[0] : w.rows[1], w.cols[0] : w.cols[1]] += d[:, None, None]
                count[w.rows[0] : w.rows[1], w.cols[0] : w.cols[1]] += 1
            per_token = total / count
            name = "image" if layout.image_index == 0 else f"image{layout.image_index}.{grid.name}"
            exp.add(name, per_token, ("answer_token", "row", "col"))
            exp.add(f"{name}.answer", per_token.sum(dim=0), ("row", "col"))
            answer_drop = part.sum(dim=1)
            here = int(torch.argmax(answer_drop))
            if float(answer_drop[here]) > worst_drop:
                worst_drop, worst_at = float(answer_drop[here]), (layout, wins[here])
        assert worst_at is not None
        whole = drops[start:].sum(dim=1).double()
        exp.scores.update({
            "logprob_answer": float(original.sum()),
            "prob_answer": float(original.sum().exp()),
            "prob_answer_worst": float((original.sum() - worst_drop).exp()),
            "max_drop": worst_drop,
            "windows": float(start),
            "forwards": float(1 + shortcuts["forwards"]),
            "prefix_tokens": float(shortcuts["prefix_tokens"]),
        })
        for layout, drop in zip(layouts, whole.tolist()):  # several pictures: each one hidden whole
            exp.scores[f"image_drop.{layout.image_index + 1}"] = drop
        layout, win = worst_at
        exp.meta.update({
            "grid": layouts[0].main_grid.name,
            "sign": SIGN_NOTE,
            "worst_window": {"image": layout.image_index, "row": win.row, "col": win.col, "cells": win.cells()},
            "logit_rows_only": shortcuts["logit_rows_only"],
            "answer_logprobs": original.tolist(),
        })
        if len(layouts) > 1:
            exp.meta["image_drop"] = ("each picture hidden whole (every image token of it, the baseline in its "
                                      "place): the drop in the answer's log-probability, scores image_drop.K")
        return exp


@register
class TextAblation(Explainer):
    """The drop in every answer token's log-probability when each question word is dropped or
    replaced by another token (a prompt-word map per answer token and one for the whole answer).

    Cost: one forward per question word plus the unablated one, batched, no backward. Word ablation
    as in occlusion (Zeiler and Fergus, 2013, arXiv 1311.2901), applied to the question's tokens.
    """

    id = "perturbation.text_ablation"
    title = "Question-word ablation"
    group = GROUP
    supports_contrast = True
    summary = (
        "Drop or replace each word of the question and measure the drop in every answer token's "
        "log-probability; all ablations batched, positions recomputed."
    )

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        mode: str = param("drop", "drop each question token, or replace it by the replacement token",
                          choices=TEXT_MODES)
        replacement: int | str | None = param(None, "the replacing token, as an id or a token (null: unk, else pad)")
        batch_size: int | None = param(None, "ablated copies per forward (null: as many as the device's budget fits)",
                                       low=1)
        fast_attention: bool = param(True, "run the ablated forwards with the fused attention kernel")

    def compute(self, model: LoadedModel, sample: Prepared, params: Params) -> Explanation:
        mode, fast_attention = params.mode, params.fast_attention
        prep = sample
        batch_size = batch_size_for(prep, params.batch_size, eager=eager_unless_fused(prep, fast_attention))
        repl = replacement_id(prep, params.replacement)
        words = question_positions(prep)
        if not words:
            raise MissingInput(f"sample {prep.sample.id!r}: the question has no ablatable tokens")
        ids = answer_ids(prep)
        # a drop shifts every later position, answer included, left by one
        shift = 1 if mode == "drop" else 0
        with fused_attention(prep.model, fast_attention):
            original = base_logprobs(prep)
            ablated = batched_logprobs(prep.model, len(words), text_batches(prep, words, mode, repl), batch_size,
                                       prep.logit_positions - shift, ids)
        drops = original[None, :] - ablated  # (words, T)
        target = prep.target()
        columns = {p: j for j, p in enumerate(target.prompt_positions)}
        grid = torch.full((len(ids), len(target.prompt_positions)), float("nan"), dtype=torch.float64)
        for i, p in enumerate(words):
            grid[:, columns[p]] = drops[i].double()
        tokens = prep.tokens()
        tok = prep.loaded.processor.tokenizer
        exp = Explanation(self.id, {"mode": mode, "replacement": repl if mode == "replace" else None,
                                    "batch_size": batch_size, "fast_attention": fast_attention}, target)
        exp.add("prompt", grid, ("answer_token", "prompt_token"))
        exp.add("prompt.answer", grid.sum(dim=0), ("prompt_token",))
        exp.scores.update({
            "logprob_answer": float(original.sum()),
            "words": float(len(words)),
            "max_drop": float(drops.sum(dim=1).max()) if words else 0.0,
        })
        exp.meta.update({
            "sign": SIGN_NOTE,
            "words": [{"position": p, "prompt_index": columns[p], "token": tokens[p]} for p in words],
            "replacement_token": tok.convert_ids_to_tokens([repl])[0] if mode == "replace" else None,
            "answer_logprobs": original.tolist(),
        })
        return exp

