"""What metrics of one sample share: its ground-truth cells and its perturbation runner, built
once and only when a metric asks, and the curves already run (metrics and plots read the same)."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .curves import DEFAULT_BASELINE, DEFAULT_STEPS, CurveRunner
from .truth import MIN_COVER, CellTruth, cell_truth

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.prepared import Prepared


@dataclass
class MetricInputs:
    """One sample's inputs to metrics. ``truth`` given explicitly (bool ``(rows, cols)``) wins over
    the one derived from ``prepared.sample.mask``; model metrics need ``prepared``."""

    prepared: "Prepared | None" = None
    truth: np.ndarray | None = None
    baseline: str = DEFAULT_BASELINE
    steps: int = DEFAULT_STEPS
    seed: int = 0
    batch_size: int | None = None
    min_cover: float = MIN_COVER
    _cell_truth: CellTruth | None = field(default=None, init=False, repr=False)
    _truth_done: bool = field(default=False, init=False, repr=False)
    _runner: CurveRunner | None = field(default=None, init=False, repr=False)
    _curves: dict[tuple[str, str], np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def cell_truth(self) -> CellTruth | None:
        if not self._truth_done:
            if self.truth is not None:
                cells = np.asarray(self.truth, dtype=bool)
                self._cell_truth = CellTruth(cells.astype(np.float64), cells)
            elif self.prepared is not None:
                self._cell_truth = cell_truth(self.prepared, min_cover=self.min_cover)
            self._truth_done = True
        return self._cell_truth

    def truth_cells(self) -> np.ndarray | None:
        """Bool ``(rows, cols)`` ground truth, or None when the sample has none."""
        found = self.cell_truth()
        return None if found is None else found.cells

    def runner(self) -> CurveRunner:
        if self._runner is None:
            if self.prepared is None:
                raise ValueError("this metric runs the model: its inputs need a prepared sample")
            self._runner = CurveRunner(self.prepared, self.baseline, self.steps, self.seed, self.batch_size)
        return self._runner

    def curves(self, kind: str, maps: Sequence[np.ndarray]) -> np.ndarray:
        """Curves of ``maps`` (cached per map and kind), ``(len(maps), steps + 1)``."""
        keys = [(kind, _digest(m)) for m in maps]
        todo = {k: m for k, m in zip(keys, maps) if k not in self._curves}
        if todo:
            for key, curve in zip(todo, self.runner().curves(kind, list(todo.values()))):
                self._curves[key] = curve
        return np.stack([self._curves[k] for k in keys]) if keys else np.zeros((0, self.steps + 1))


def _digest(map2d: np.ndarray) -> str:
    arr = np.ascontiguousarray(np.asarray(map2d, dtype=np.float64))
    return hashlib.sha1(arr.tobytes() + str(arr.shape).encode()).hexdigest()
