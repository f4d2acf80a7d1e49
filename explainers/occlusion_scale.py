"""How ``xmllm bench --scale`` measures an occlusion of the main grid's cells.

Shared by perturbation.occlusion and training.compare (which runs one occlusion per checkpoint):
explainer modules import no other explainer module, so the part of their scale plans they have in
common lives here. Call it as :meth:`~xmllm.explainers.registry.Explainer.scale_plan` is called,
under the bench's planning budget.
"""
from __future__ import annotations

from dataclasses import dataclass

from xmllm.explainers.prepared import Prepared
from .forward import batch_size_for
from .masking import first_layout, windows
from .scaleplan import costs, windows_count


@dataclass(frozen=True)
class OcclusionScale:
    """An occlusion at the defaults (one-cell windows) as the bench sees it."""

    copies: int
    """Copies per forward the defaults batch (the budget's GPU, full depth)."""
    rows: int
    cols: int
    """The main grid's size in cells."""
    cost: dict[str, float]
    """One occlusion's cost at the defaults: the unoccluded forward, one copy per cell, and one more."""

    def window_for(self, batch: int) -> int:
        """The largest window with enough windows to fill ``batch`` copies: a measured forward of that
        batch with fewer windows in all than the defaults' cells."""
        window = 1
        while window < max(self.rows, self.cols) and windows_count(self.rows, self.cols, window + 1) >= batch:
            window += 1
        return window


def occlusion_scale(prep: Prepared) -> OcclusionScale:
    """The occlusion of ``prep``'s main grid at the defaults: batch, grid and cost."""
    copies = batch_size_for(prep, None)
    grid = first_layout(prep).main_grid
    cells = len(windows(first_layout(prep), 1, 1, "all"))
    return OcclusionScale(copies, grid.rows, grid.cols, costs(1 + cells + 1))
