"""Deletion and insertion curves (Petsiuk et al. 2018; Quantus's region perturbation): real forwards.

Cells of the scored picture's main grid (the first image's, or the evidence picture's; see
:func:`~xmllm.explainers.masking.scored_picture`) are ranked by the map, most relevant first. *Deletion*
replaces the top ``n_k`` cells with the baseline and records the probability of the model's
answer (teacher-forced, every answer token: ``exp(sum log p)``); *insertion* starts from the
baseline image and puts the top ``n_k`` cells back. ``n_k = round(k N / steps)`` for ``k =
0..steps`` over ``N`` cells, and the area is the trapezoid rule over the fraction of cells
``n_k / N``, so it lies in [0, 1]. A faithful map makes the deletion curve fall fast (small area)
and the insertion curve rise fast (large area).

A cell is perturbed in pixel space through the adapter's ``pixel_cell_map`` (all views of the
region, as ``perturbation.occlusion`` does), with the baselines of ``perturbation.py`` passed
through the model's own processor. Cells tied in the map are ordered by one seeded permutation
per sample (shared by every map), so a constant map is a random order, not a raster scan. The
two endpoints (the input, the baseline) are shared by every map of a sample; the other points
of every map go through batched forwards.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from xmllm.explainers.masking import BASELINES, PixelCells, baseline_pixels, cell_map, scored_layout, window_positions
from xmllm.explainers.forward import answer_ids, batch_size_for, batched_logprobs, fused_attention, repeat_inputs
from ..params import choice, positive_int
from .maps import check_map

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.prepared import Prepared

KINDS: tuple[str, ...] = ("deletion", "insertion")
DEFAULT_STEPS = 8
"""Curve points after the start: on an 8x8 grid, 8 cells per step."""
DEFAULT_BASELINE = "black"
"""The demo world's background is near-black, so a black cell reads as an empty cell."""
SCORE_NOTE = "probability of the model's whole answer, exp(sum of the answer tokens' log-probabilities)"


def step_counts(cells: int, steps: int) -> list[int]:
    """Cells perturbed at each point: ``round(k * cells / steps)`` for ``k = 0..steps``."""
    return [int(round(k * cells / steps)) for k in range(steps + 1)]


def area_under(curve: Sequence[float], fractions: Sequence[float]) -> float:
    """Trapezoid area of ``curve`` over ``fractions`` (0 to 1)."""
    y, x = np.asarray(curve, dtype=np.float64), np.asarray(fractions, dtype=np.float64)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


class CurveRunner:
    """The perturbed forwards of one prepared sample: cells, baseline, tie-break, endpoints."""

    def __init__(self, prepared: "Prepared", baseline: str = DEFAULT_BASELINE, steps: int = DEFAULT_STEPS,
                 seed: int = 0, batch_size: int | None = None) -> None:
        self.prepared = prepared
        self.baseline_kind = choice("baseline", baseline, BASELINES)
        layout = scored_layout(prepared)
        grid = layout.main_grid
        self.shape = (grid.rows, grid.cols)
        self.cells = [window_positions(layout, (r, r + 1), (c, c + 1), "all")
                      for r in range(grid.rows) for c in range(grid.cols)]
        self.steps = positive_int("steps", steps)
        if self.steps > len(self.cells):
            raise ValueError(f"parameter steps={steps} exceeds the grid's {len(self.cells)} cells")
        self.counts = step_counts(len(self.cells), self.steps)
        self.fractions = [n / len(self.cells) for n in self.counts]
        self.tiebreak = np.random.default_rng([seed, 0xDE1]).permutation(len(self.cells))
        self.batch_size = batch_size_for(prepared, batch_size)
        self.pixel_cells = PixelCells(cell_map(prepared))
        self.pixels = prepared.inputs["pixel_values"]
        self.base = baseline_pixels(prepared, self.baseline_kind, seed)
        self.forwards = 0
        self._ends: tuple[float, float] | None = None

    def order(self, map2d: np.ndarray) -> np.ndarray:
        """Cell indices (row-major), most relevant first; ties by the sample's permutation."""
        values = check_map(map2d, self.shape).ravel()
        if not np.isfinite(values).all():
            raise ValueError("the map has non-finite values: cannot rank its cells")
        return np.lexsort((self.tiebreak, -values))

    def _probabilities(self, sources: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> np.ndarray:
        """p(answer) for each (start pixels, replacement pixels, positions to replace)."""
        prep = self.prepared
        inputs = dict(prep.inputs)

        def make(start: int, stop: int) -> dict[str, Any]:
            batch = repeat_inputs(inputs, stop - start)
            batch["pixel_values"] = torch.cat(
                [self.pixel_cells.masked(a, b, [p]) for a, b, p in sources[start:stop]], dim=0)
            return batch

        self.forwards += -(-len(sources) // self.batch_size)
        with fused_attention(prep.model):
            logp = batched_logprobs(prep.model, len(sources), make, self.batch_size, prep.logit_positions,
                                    answer_ids(prep))
        return logp.double().sum(dim=-1).exp().numpy()

    def endpoints(self) -> tuple[float, float]:
        """p(answer) on the input and on the baseline image (every cell perturbed)."""
        if self._ends is None:
            none = torch.empty(0, dtype=torch.long)
            full, empty = self._probabilities([(self.pixels, self.base, none), (self.base, self.pixels, none)])
            self._ends = (float(full), float(empty))
        return self._ends

    def curves(self, kind: str, maps: Sequence[np.ndarray]) -> np.ndarray:
        """``(len(maps), steps + 1)`` probabilities along each map's deletion or insertion curve."""
        kind = choice("kind", kind, KINDS)
        orders = [self.order(m) for m in maps]
        full, empty = self.endpoints()
        inner = self.counts[1:-1]
        start, other = (self.pixels, self.base) if kind == "deletion" else (self.base, self.pixels)
        sources = []
        for order in orders:
            for n in inner:
                sources.append((start, other, torch.cat([self.cells[i] for i in order[:n]])))
        probs = self._probabilities(sources).reshape(len(maps), len(inner)) if sources else np.zeros((len(maps), 0))
        first, last = (full, empty) if kind == "deletion" else (empty, full)
        return np.concatenate([np.full((len(maps), 1), first), probs, np.full((len(maps), 1), last)], axis=1)
