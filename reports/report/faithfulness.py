"""Each image map's deletion and insertion on its own sample, as a section of the report shows it.

The runner scores every explainer's image map when the run is made (``manifest["faithfulness"]``,
see :func:`xmllm.runner.faithfulness_entry`); this module turns one explainer's entry into
what the template draws: both areas, the settings, and the two curves as inline SVG (points
computed here, so the page needs no script and loads nothing for them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PLOT_WIDTH, PLOT_HEIGHT = 300, 150
"""Size of the curves' SVG in CSS pixels."""
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 44, 10, 20, 30
KINDS = (
    # kind, how to read its area, colour of its curve
    ("deletion", "lower is better: removing the most relevant cells first should lose the answer fast", "#c92a2a"),
    ("insertion", "higher is better: restoring the most relevant cells first should bring the answer back fast",
     "#1c7ed6"),
)


@dataclass(frozen=True)
class Curve:
    kind: str
    area: float
    reading: str
    colour: str
    points: str
    """SVG polyline points in plot pixels."""
    fill: str
    """The same polyline closed along the x axis: the area as a shape."""
    values: list[float]


@dataclass(frozen=True)
class FaithfulnessBlock:
    """What a section shows: the map scored, its two curves and areas, and the settings."""

    map_name: str
    baseline: str
    steps: int
    seed: int | None
    score: str
    curves: list[Curve]
    fractions: list[float]
    y_max: float
    axes: dict[str, Any]
    """Axis lines and tick labels of the plot, in plot pixels."""


@dataclass(frozen=True)
class FaithfulnessSkip:
    """An explainer whose map was not scored, and why."""

    reason: str


def block_for(manifest: dict[str, Any], explainer_id: str) -> FaithfulnessBlock | FaithfulnessSkip | None:
    """The block of ``explainer_id`` from the manifest's ``faithfulness`` entry (None: the run has
    no entry for it, e.g. an explainer without an image map or a run made with it skipped)."""
    entry = manifest.get("faithfulness")
    if not isinstance(entry, dict):
        return None
    skipped = entry.get("skipped") or {}
    if isinstance(skipped, dict) and isinstance(skipped.get(explainer_id), str):
        return FaithfulnessSkip(skipped[explainer_id])
    mine = (entry.get("explainers") or {}).get(explainer_id)
    fractions = entry.get("fractions")
    if not isinstance(mine, dict) or not _numbers(fractions):
        return None
    y_max = _y_max([mine.get(f"{kind}_curve") for kind, _, _ in KINDS])
    curves = []
    for kind, reading, colour in KINDS:
        values, area = mine.get(f"{kind}_curve"), mine.get(f"{kind}_area")
        if not _numbers(values) or len(values) != len(fractions) or not _numbers([area]):
            return None
        xy = [(_x(f), _y(v, y_max)) for f, v in zip(fractions, values)]
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
        floor = _y(0.0, y_max)
        fill = f"{xy[0][0]:.1f},{floor:.1f} {points} {xy[-1][0]:.1f},{floor:.1f}"
        curves.append(Curve(kind, float(area), reading, colour, points, fill, [float(v) for v in values]))
    return FaithfulnessBlock(
        map_name=str(mine.get("map", "")),
        baseline=str(entry.get("baseline", "")),
        steps=int(entry.get("steps") or len(fractions) - 1),
        seed=entry.get("seed") if isinstance(entry.get("seed"), int) else None,
        score=str(entry.get("score", "")),
        curves=curves,
        fractions=[float(f) for f in fractions],
        y_max=y_max,
        axes=_axes(y_max),
    )


def _numbers(values: Any) -> bool:
    return (isinstance(values, list) and bool(values)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values))


def _y_max(curves: list[Any]) -> float:
    """The plot's top: the largest probability on either curve (the answer's probability may be
    far below 1 on an untrained model), or 1 when both curves are flat at zero."""
    top = max((max(c) for c in curves if _numbers(c)), default=0.0)
    return float(top) if top > 0 else 1.0


def _x(fraction: float) -> float:
    return MARGIN_LEFT + fraction * (PLOT_WIDTH - MARGIN_LEFT - MARGIN_RIGHT)


def _y(value: float, y_max: float) -> float:
    inner = PLOT_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    return MARGIN_TOP + inner * (1.0 - min(max(value / y_max, 0.0), 1.0))


def _axes(y_max: float) -> dict[str, Any]:
    bottom, top = _y(0.0, y_max), _y(y_max, y_max)
    left, right = _x(0.0), _x(1.0)
    return {
        "left": left, "right": right, "top": top, "bottom": bottom,
        "x_ticks": [{"x": _x(f), "label": f"{f:g}"} for f in (0.0, 0.5, 1.0)],
        "y_ticks": [{"y": bottom, "label": "0"}, {"y": top, "label": f"{y_max:.3g}"}],
        "x_label": {"x": (left + right) / 2, "y": PLOT_HEIGHT - 4},
        "legend": [{"x": left + 70 * k, "y": MARGIN_TOP - 8} for k in range(len(KINDS))],
        "width": PLOT_WIDTH, "height": PLOT_HEIGHT,
    }
