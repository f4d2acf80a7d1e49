"""Colour palettes shared by the interactive figures and the static ones (both from matplotlib).

Plain maps use viridis; maps with both signs use a diverging red-blue (red above zero) with
symmetric limits. Overlay palettes fade to transparent where the magnitude is small, so the
image stays visible under the weak part of a map.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

STEPS = 256
PLAIN, SIGNED = "viridis", "RdBu_r"
FLOOR_ALPHA = 0.12
"""Overlay opacity at the weakest end of a map (times the page's opacity control)."""


def alpha_ramp(signed: bool, steps: int = STEPS) -> np.ndarray:
    """Per-entry opacity of an overlay palette: rising with |value| (from zero for signed maps)."""
    t = np.linspace(0.0, 1.0, steps)
    strength = np.abs(2 * t - 1) if signed else t
    return FLOOR_ALPHA + (1 - FLOOR_ALPHA) * strength ** 0.8


def rgba(name: str, overlay: bool, steps: int = STEPS) -> np.ndarray:
    """``steps`` RGBA rows (floats 0..1) of a matplotlib colour map, see-through if ``overlay``."""
    from matplotlib import colormaps

    colours = colormaps[name].resampled(steps)(np.arange(steps))
    if overlay:
        colours[:, 3] = alpha_ramp(name == SIGNED, steps)
    return colours


@lru_cache(maxsize=2)
def palettes(overlay: bool) -> dict[str, list[str]]:
    """Hex palettes (``#rrggbb``, or ``#rrggbbaa`` for overlays) keyed ``plain`` and ``signed``."""
    out = {}
    for key, name in (("plain", PLAIN), ("signed", SIGNED)):
        rows = np.round(rgba(name, overlay) * 255).astype(int)
        out[key] = ["#" + "".join(f"{v:02x}" for v in (row if overlay else row[:3])) for row in rows]
    return out
