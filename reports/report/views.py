"""Views: how a report draws an explanation's arrays, chosen by the arrays' axes.

Each view class claims the maps it can draw (by axis names and sizes, in :data:`VIEWS` order)
and renders them as a Bokeh figure wired to the section's controls plus a static PNG. Any
explainer whose arrays follow the axis conventions of :mod:`xmllm.explainers.explanation` is drawn
without report code of its own; whatever no view claims is listed in a table. A new kind of
view is a subclass registered with :func:`register_view`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from bokeh.models import ColumnDataSource
from PIL import Image

from xmllm.explainers.explanation import Explanation

from . import figures, static
from .slabs import VALUE_BUDGET, Slab, build_slab, describe, stack_slabs

IMAGE_AXES = ("row", "col")
ANSWER_SUFFIX = ".answer"
BAR_AXES = frozenset({"prompt_token", "modality"})
"""Last axes drawn as bars whatever the leading axes (other one-dimensional maps are bars too)."""
MAX_GRID_CELLS = 128 * 128
MAX_BARS = 400
MAX_HEATMAP_SIDE = 400
MAX_HEATMAP_CELLS = 40_000
MATRIX_VALUES = 120
"""Bar views of at most this many values also list them in a table (readable, and printable)."""
TABLE_VALUES = 64
"""Arrays no view draws list their values when they have at most this many."""
SCALE_NOTE = "Colours are scaled to the shown slice; hover for values (stored to about four significant digits)."


@dataclass
class Placement:
    """Where an image map lies: which input image, and which part of it (fractions, or None)."""

    image: int | None
    region: tuple[float, float, float, float] | None


@dataclass
class PageImages:
    """The run's input images, each once in the page, shared by every overlay."""

    images: list[Image.Image]
    sources: list[ColumnDataSource]
    sizes: list[tuple[int, int]]
    placements: dict[str, Placement] = field(default_factory=dict)

    @classmethod
    def build(cls, images: list[Image.Image], layouts: list[dict[str, Any]] | None) -> "PageImages":
        shown = [figures.display_image(img) for img in images]
        sources = [ColumnDataSource({"url": [figures.png_data_uri(img)]}, name=f"image:{k}") for k, img in enumerate(shown)]
        placements = {}
        for layout in layouts or []:
            for grid in layout.get("grids", []):
                region = grid.get("region")
                placements[grid["map"]] = Placement(int(layout["image"]), tuple(region) if region else None)
        return cls(images, sources, [img.size for img in images], placements)

    def place(self, map_name: str) -> Placement:
        """The grid a map is drawn on: the longest known grid name that prefixes the map name
        (``image1.tile0.answer`` -> ``image1.tile0``); without layouts, ``image{k}`` -> image k."""
        best = max((k for k in self.placements if map_name == k or map_name.startswith(k + ".")), key=len, default=None)
        if best is not None:
            return self.placements[best]
        if self.placements:
            return Placement(None, None)
        match = re.match(r"image(\d*)(\.|$)", map_name)
        index = int(match.group(1) or 0) if match else 0
        return Placement(index if index < len(self.images) else None, (0.0, 0.0, 1.0, 1.0))


@dataclass
class ViewOut:
    """One rendered view: its Bokeh roots, static PNG, notes, or a table of what it holds."""

    title: str
    kind: str
    roots: list[Any] = field(default_factory=list)
    static: str | None = None
    static_alt: str = ""
    notes: list[str] = field(default_factory=list)
    table: list[dict[str, Any]] | None = None
    matrix: dict[str, Any] | None = None
    """Small maps also as a table of numbers: ``columns`` (labels) and ``rows`` (name, values)."""


class View:
    """Base class: claim groups of maps by their axes, render each group."""

    kind: ClassVar[str]
    order: ClassVar[int]

    def __init__(self, exp: Explanation, names: list[str]) -> None:
        self.exp, self.names = exp, names

    @classmethod
    def claim(cls, exp: Explanation, free: list[str]) -> list[list[str]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def render(self, controls: figures.SectionControls, page: PageImages) -> ViewOut:  # pragma: no cover
        raise NotImplementedError


VIEWS: list[type[View]] = []


def register_view(cls: type[View]) -> type[View]:
    VIEWS.append(cls)
    VIEWS.sort(key=lambda c: c.order)
    return cls


def plan(exp: Explanation) -> list[View]:
    """Every map of ``exp`` assigned to one view, views in registry order."""
    free = list(exp.maps)
    out: list[View] = []
    for cls in VIEWS:
        for group in cls.claim(exp, free):
            out.append(cls(exp, group))
            free = [n for n in free if n not in group]
    return out


def sibling_of(exp: Explanation, name: str, free: list[str]) -> str | None:
    """``name.answer`` when it holds ``name`` aggregated over its answer tokens."""
    axes = exp.axes[name]
    other = name + ANSWER_SUFFIX
    if other not in free or "answer_token" not in axes:
        return None
    t = axes.index("answer_token")
    want_axes = axes[:t] + axes[t + 1:]
    want_shape = exp.maps[name].shape[:t] + exp.maps[name].shape[t + 1:]
    return other if exp.axes[other] == want_axes and exp.maps[other].shape == want_shape else None


def with_siblings(exp: Explanation, names: list[str], free: list[str]) -> list[list[str]]:
    """Each name grouped with its ``.answer`` sibling, if free; a sibling is not repeated alone
    (``names`` lists maps with an answer-token axis first, so the base map takes its sibling)."""
    groups, used = [], set()
    for name in names:
        if name in used:
            continue
        sib = sibling_of(exp, name, free)
        group = [name] + ([sib] if sib else [])
        used.update(group)
        groups.append(group)
    return groups


def _fits(exp: Explanation, name: str, drawn: int) -> bool:
    return int(np.prod(exp.maps[name].shape[-drawn:], dtype=np.int64)) <= VALUE_BUDGET if drawn else True


@register_view
class ImageView(View):
    """Maps over an image's patch grid, laid over the image; a tap on a patch colours the
    answer tokens by their value there (LVLM-Interpret's patch -> answer view)."""

    kind = "image"
    order = 10

    @classmethod
    def claim(cls, exp: Explanation, free: list[str]) -> list[list[str]]:
        names = [n for n in free if exp.axes[n][-2:] == IMAGE_AXES
                 and int(np.prod(exp.maps[n].shape[-2:])) <= MAX_GRID_CELLS]
        names.sort(key=lambda n: "answer_token" not in exp.axes[n])
        return with_siblings(exp, names, free)

    def render(self, controls: figures.SectionControls, page: PageImages) -> ViewOut:
        name = self.names[0]
        slab = build_slab(self.exp, name, 2, self.names[1] if len(self.names) > 1 else None)
        where = page.place(name)
        image = page.images[where.image] if where.image is not None and where.region is not None else None
        rows, cols = slab.values.shape[-2:]
        if image is not None:
            background, size, region = page.sources[where.image], page.sizes[where.image], where.region
        else:  # no image or an unknown region: the grid alone, one square per cell
            background, size, region = None, (cols * 10, rows * 10), None
        notes = [SCALE_NOTE, *slab.notes]
        if image is None:
            notes.append("Drawn without the image: the run folder does not say where this grid lies on it.")
        if slab.axis("answer_token") is not None:
            notes.append("Click a patch to colour the answer tokens by their value at it; click a token to show its map.")
        roots = figures.overlay_figure(slab, controls, background, size, region)
        png = static.overlay_png(slab, image, region)
        return ViewOut(_title(self.names), self.kind, roots, png, f"{name} over the image", notes)


XY_AXIS = "xy"
MAX_POINTS = 20_000
MAX_GROUPS = 10
"""Per-point metadata with at most this many distinct values can colour a scatter's points."""
GROUP_HINTS = ("group", "modality", "kind", "label")
"""Per-point metadata colouring a scatter, in order of preference (``meta['<axis>_<hint>']``)."""


@register_view
class ScatterView(View):
    """Maps ending in an ``xy`` axis of two: points in a plane (projections), chosen per leading
    axis; per-point metadata (``meta['<axis>_...']`` lists) shows on hover and colours groups."""

    kind = "scatter"
    order = 15

    @classmethod
    def claim(cls, exp: Explanation, free: list[str]) -> list[list[str]]:
        return [[n] for n in free if len(exp.axes[n]) >= 2 and exp.axes[n][-1] == XY_AXIS
                and exp.maps[n].shape[-1] == 2 and exp.maps[n].shape[-2] <= MAX_POINTS]

    def render(self, controls: figures.SectionControls, page: PageImages) -> ViewOut:
        name = self.names[0]
        slab = build_slab(self.exp, name, 2)
        point_axis, count = slab.drawn[0], slab.values.shape[-2]
        info = {key: [str(v) for v in value] for key, value in sorted(self.exp.meta.items())
                if key.startswith(point_axis + "_") and isinstance(value, list) and len(value) == count}
        group = next((k for hint in GROUP_HINTS for k in info if k == f"{point_axis}_{hint}"
                      and 1 < len(set(info[k])) <= MAX_GROUPS), None)
        notes = [*slab.notes, "Hover a point for what it is" + (f"; colours show {group}." if group else ".")]
        return ViewOut(name, self.kind, figures.scatter_figure(slab, controls, info, group),
                       static.scatter_png(slab, info.get(group) if group else None), f"{name} as points", notes)


@register_view
class BarView(View):
    """Maps over prompt tokens, modalities or any one axis: one bar per entry."""

    kind = "bars"
    order = 20

    @classmethod
    def claim(cls, exp: Explanation, free: list[str]) -> list[list[str]]:
        names = [n for n in free if exp.axes[n] and (exp.axes[n][-1] in BAR_AXES or len(exp.axes[n]) == 1)
                 and exp.maps[n].shape[-1] <= MAX_BARS and _fits(exp, n, 1)]
        names.sort(key=lambda n: "answer_token" not in exp.axes[n])
        groups = with_siblings(exp, names, free)
        return _stack_alike(exp, groups)

    def render(self, controls: figures.SectionControls, page: PageImages) -> ViewOut:
        slab = _slab(self.exp, self.names, 1)
        out = ViewOut(_title(self.names), self.kind, figures.bar_figure(slab, controls), static.bar_png(slab),
                      f"{', '.join(self.names)} as bars", [SCALE_NOTE, *slab.notes])
        if slab.values.size <= MATRIX_VALUES and all(a.name == "map" for a in slab.lead):
            names = slab.lead[0].labels if slab.lead else [slab.name]
            rows = slab.values.reshape(len(names), -1)
            out.matrix = {"columns": slab.drawn_labels[0], "rows": list(zip(names, rows.tolist()))}
        return out


@register_view
class HeatmapView(View):
    """Any other map of two or more axes: its last two as a matrix (e.g. layer x head), the
    rest chosen with controls; maps of identical axes are one figure with a map chooser."""

    kind = "heatmap"
    order = 30

    @classmethod
    def claim(cls, exp: Explanation, free: list[str]) -> list[list[str]]:
        names = []
        for n in free:
            shape = exp.maps[n].shape
            if len(shape) >= 2 and max(shape[-2:]) <= MAX_HEATMAP_SIDE and shape[-2] * shape[-1] <= MAX_HEATMAP_CELLS:
                names.append(n)
        names.sort(key=lambda n: "answer_token" not in exp.axes[n])
        return _stack_alike(exp, with_siblings(exp, names, free))

    def render(self, controls: figures.SectionControls, page: PageImages) -> ViewOut:
        slab = _slab(self.exp, self.names, 2)
        return ViewOut(_title(self.names), self.kind, figures.heatmap_figure(slab, controls), static.heatmap_png(slab),
                       f"{', '.join(self.names)} as a heatmap", [SCALE_NOTE, *slab.notes])


@register_view
class TableView(View):
    """Whatever no other view draws: shape and statistics, and the values of small arrays."""

    kind = "table"
    order = 99

    @classmethod
    def claim(cls, exp: Explanation, free: list[str]) -> list[list[str]]:
        return [list(free)] if free else []

    def render(self, controls: figures.SectionControls, page: PageImages) -> ViewOut:
        rows = []
        for name in self.names:
            values = self.exp.maps[name]
            row = {"name": name, "axes": ", ".join(self.exp.axes[name]) or "(scalar)", **describe(values)}
            if values.size <= TABLE_VALUES:
                row["values"] = np.round(np.asarray(values, dtype=np.float64), 6).tolist()
            rows.append(row)
        return ViewOut("Other arrays", self.kind, table=rows,
                       notes=["No interactive view draws these arrays; their shape and statistics follow."])


def _stack_alike(exp: Explanation, groups: list[list[str]]) -> list[list[str]]:
    """Single maps (no sibling) of identical axes and shape merged into one stacked group."""
    out: list[list[str]] = []
    by_key: dict[tuple, list[str]] = {}
    for group in groups:
        if len(group) == 1:
            name = group[0]
            key = (exp.axes[name], exp.maps[name].shape)
            if key in by_key:
                by_key[key].append(name)
                continue
            by_key[key] = group
        out.append(group)
    return out


def _slab(exp: Explanation, names: list[str], drawn: int) -> Slab:
    if len(names) == 2 and names[1] == names[0] + ANSWER_SUFFIX and sibling_of(exp, names[0], names):
        return build_slab(exp, names[0], drawn, names[1])
    return stack_slabs(exp, names, drawn)


def _title(names: list[str]) -> str:
    if len(names) == 2 and names[1] == names[0] + ANSWER_SUFFIX:
        return f"{names[0]} (per answer token and {names[1]})"
    return ", ".join(names)
