"""Bokeh pieces of a report: controls, overlays on the image, token strips, bars and heatmaps.

Every interactive figure plots one slice of a :class:`~.slabs.Slab` and is wired to the page's
``xmllm.update`` (templates/report.js) through one CustomJS per view, which the view's
controls, its patch taps and its token strip all trigger.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from bokeh.models import (
    CategoricalColorMapper,
    ColorBar,
    ColumnDataSource,
    CustomJS,
    CustomJSTickFormatter,
    HoverTool,
    LinearColorMapper,
    Range1d,
    Select,
    Slider,
    TapTool,
    Title,
)
from bokeh.plotting import figure
from bokeh.transform import transform
from PIL import Image

from .palettes import palettes
from .slabs import Axis, Slab, colour_range, is_signed

MISSING = "#d9d9d9"
OVERLAY_ALPHA = 0.6
IMAGE_FRAME = 340
"""Width in pixels of the image frame of an overlay view."""
MIN_IMAGE_SIDE = 256
"""Small images are enlarged (nearest neighbour, integer factor) to at least this for display."""
MAX_IMAGE_SIDE = 640
"""Large images are shrunk to at most this for display: the page embeds them."""
VALUE_TOOLTIP = ("value", "@value{%0.4g}")
UPDATE = "xmllm.update({src, store, mapper, lead, spec, strip, strip_title})"
"""The CustomJS body of every view: all logic lives in templates/report.js."""
STRIP_HINT = "click a patch: each answer token is coloured by its value at that patch"


def png_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def display_image(image: Image.Image) -> Image.Image:
    """The image as the page shows it: small ones enlarged crisply, large ones shrunk."""
    side = max(image.size)
    if side < MIN_IMAGE_SIDE:
        factor = -(-MIN_IMAGE_SIDE // side)
        return image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    if side > MAX_IMAGE_SIDE:
        scale = MAX_IMAGE_SIDE / side
        return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
    return image


@dataclass
class SectionControls:
    """The controls of one explainer section, shared by every view in it that has the same axis."""

    prefix: str
    widgets: dict[tuple[str, tuple[str, ...]], Any] = field(default_factory=dict)
    overlays: list[Any] = field(default_factory=list)
    opacity: Slider | None = None

    def control(self, axis: Axis, owner: str = "") -> Any | None:
        """The widget choosing ``axis`` (made once per distinct axis and labels; a second one of
        the same name says which map ``owner`` it is for); None for one-entry axes."""
        if axis.size < 2:
            return None
        key = (axis.name, tuple(axis.labels))
        if key not in self.widgets:
            same_name = sum(1 for name, _ in self.widgets if name == axis.name)
            name = f"{self.prefix}:control:{axis.name}" + (f":{same_name}" if same_name else "")
            title = f"{axis.title} ({owner})" if same_name and owner else axis.title
            if axis.slider:  # the value shown is the entry's label (a layer's number), not the index
                label = CustomJSTickFormatter(args={"labels": axis.labels}, code="return labels[tick];")
                widget = Slider(start=0, end=axis.size - 1, step=1, value=axis.default, format=label,
                                title=title, name=name, width=240)
            else:
                widget = Select(title=title, value=str(axis.default), name=name, width=200,
                                options=[(str(i), label) for i, label in enumerate(axis.labels)])
            self.widgets[key] = widget
        return self.widgets[key]

    def add_overlay(self, renderer: Any) -> None:
        self.overlays.append(renderer)
        if self.opacity is None:
            self.opacity = Slider(start=0.0, end=1.0, step=0.05, value=OVERLAY_ALPHA, title="map opacity",
                                  name=f"{self.prefix}:control:opacity", width=200)
            self.opacity.js_on_change("value", CustomJS(args={"renderers": self.overlays}, code=(
                "for (const r of renderers) { for (const g of [r.glyph, r.selection_glyph, r.nonselection_glyph]) "
                "{ if (g) g.fill_alpha = cb_obj.value; } }")))

    def all(self) -> list[Any]:
        return list(self.widgets.values()) + ([self.opacity] if self.opacity is not None else [])


@dataclass
class Wired:
    """What a view's CustomJS needs, filled in by the figure builders."""

    slab: Slab
    controls: SectionControls
    src: ColumnDataSource
    mapper: LinearColorMapper | None
    strip: ColumnDataSource | None = None
    strip_title: Title | None = None
    overlay: bool = False
    """Colours see-through at low magnitudes, so the image shows where the map is weak."""
    xy: bool = False
    """A scatter: each slice is (points, 2) and sets the source's x and y."""

    def callback(self) -> CustomJS:
        slab = self.slab
        lead = [self.controls.control(a, slab.name) for a in slab.lead]
        t = slab.axis("answer_token")
        store = ColumnDataSource({"v": slab.flat()}, name=f"{self.controls.prefix}:{slab.name}:store")
        spec = {
            "sizes": [a.size for a in slab.lead],
            "defaults": [a.default for a in slab.lead],
            "cells": slab.cells,
            "token_axis": -1 if t is None else t,
            "strip_count": 0 if t is None else slab.lead[t].size - slab.lead[t].extra,
            "overlay": self.overlay,
            "xy": self.xy,
            "missing": MISSING,
            "strip_hint": STRIP_HINT,
        }
        return CustomJS(args={"src": self.src, "store": store, "mapper": self.mapper, "lead": lead, "spec": spec,
                              "strip": self.strip, "strip_title": self.strip_title}, code=UPDATE)

    def wire(self) -> None:
        cb = self.callback()
        for axis in self.slab.lead:
            widget = self.controls.control(axis, self.slab.name)
            if widget is not None:
                widget.js_on_change("value", cb)
        if self.strip is not None:
            self.src.selected.js_on_change("indices", cb)


def mapper_for(values: np.ndarray, overlay: bool = False, missing: str = MISSING) -> LinearColorMapper:
    """A colour mapper for one slice: diverging and symmetric when it has both signs (the same
    rule the page's script applies to every slice it shows)."""
    signed = is_signed(values)
    lo, hi = colour_range(values, signed)
    return LinearColorMapper(palette=palettes(overlay)["signed" if signed else "plain"], low=lo, high=hi,
                             nan_color=missing)


def _hover(renderer: Any, tooltips: list[tuple[str, str]]) -> HoverTool:
    return HoverTool(renderers=[renderer], tooltips=tooltips, formatters={"@value": "printf"})


def _bare(p: Any) -> None:
    p.toolbar.logo = None
    p.toolbar.autohide = True
    p.grid.visible = False
    p.outline_line_color = None


def overlay_figure(slab: Slab, controls: SectionControls, background: ColumnDataSource | None,
                   size: tuple[int, int], region: tuple[float, float, float, float] | None) -> list[Any]:
    """The map's grid cells laid over (the region of) the image, with hover, tap and opacity;
    plus, when the map has an answer-token axis, the strip of answer tokens a tap colours."""
    width, height = size
    top, left, bottom, right = region or (0.0, 0.0, 1.0, 1.0)
    rows, cols = slab.values.shape[-2:]
    r, c = np.divmod(np.arange(rows * cols), cols)
    cell_w, cell_h = (right - left) * width / cols, (bottom - top) * height / rows
    values = slab.slice(slab.default_index()).ravel()
    src = ColumnDataSource({
        "x": left * width + (c + 0.5) * cell_w, "y": height - (top * height + (r + 0.5) * cell_h),
        "row": r, "col": c, "value": values.astype(np.float64),
    }, name=f"{controls.prefix}:{slab.name}:cells")
    mapper = mapper_for(values, overlay=True, missing="rgba(0, 0, 0, 0)")
    frame_h = max(60, round(IMAGE_FRAME * height / width))
    p = figure(x_range=Range1d(0, width, bounds="auto"), y_range=Range1d(0, height, bounds="auto"),
               frame_width=IMAGE_FRAME, frame_height=frame_h, tools="tap,wheel_zoom,pan,reset",
               toolbar_location="right", name=f"{controls.prefix}:{slab.name}:figure")
    _bare(p)
    p.axis.visible = False
    if background is not None:
        p.image_url(url="url", x=0, y=height, w=width, h=height, anchor="top_left", source=background)
    fill = transform("value", mapper)
    cells = p.rect("x", "y", cell_w, cell_h, source=src, fill_color=fill, fill_alpha=OVERLAY_ALPHA, line_color=None,
                   selection_fill_color=fill, selection_fill_alpha=OVERLAY_ALPHA, selection_line_color="#ffffff",
                   selection_line_width=2.5, nonselection_fill_color=fill, nonselection_fill_alpha=OVERLAY_ALPHA,
                   nonselection_line_color=None)
    p.add_tools(_hover(cells, [("row", "@row"), ("col", "@col"), VALUE_TOOLTIP]))
    p.select_one(TapTool).renderers = [cells]
    controls.add_overlay(cells)
    wired = Wired(slab, controls, src, mapper, overlay=True)
    parts: list[Any] = [p]
    t = slab.axis("answer_token")
    if t is not None:
        wired.strip, wired.strip_title, strip_fig = token_strip(slab, controls, t)
        parts.append(strip_fig)
    wired.wire()
    return parts


def token_strip(slab: Slab, controls: SectionControls, t: int) -> tuple[ColumnDataSource, Title, Any]:
    """The answer tokens as boxes; a patch tap colours them, a click on one picks that token."""
    axis = slab.lead[t]
    count = axis.size - axis.extra
    labels = [label.split(": ", 1)[-1] for label in axis.labels[:count]]
    src = ColumnDataSource({"x": list(range(count)), "token": labels, "label": [_short(l) for l in labels],
                            "value": [float("nan")] * count, "colour": [MISSING] * count,
                            "text_colour": ["#000000"] * count},
                           name=f"{controls.prefix}:{slab.name}:strip")
    title = Title(text=STRIP_HINT, text_font_size="11px", text_font_style="normal")
    p = figure(x_range=Range1d(-0.5, count - 0.5), y_range=Range1d(-0.5, 0.5), tools="tap",
               frame_width=min(760, max(IMAGE_FRAME, 56 * count)), frame_height=34, title=title,
               toolbar_location=None, name=f"{controls.prefix}:{slab.name}:strip-figure")
    _bare(p)
    p.axis.visible = False
    boxes = p.rect("x", 0, 0.94, 0.9, source=src, fill_color="colour", line_color="#666666",
                   nonselection_fill_alpha=1.0, selection_fill_alpha=1.0, nonselection_line_color="#666666",
                   selection_line_color="#000000", selection_line_width=2)
    p.text("x", 0, text="label", source=src, text_align="center", text_baseline="middle", text_font_size="11px",
           text_color="text_colour")
    p.add_tools(_hover(boxes, [("token", "@token"), VALUE_TOOLTIP]))
    select = controls.control(axis, slab.name)
    if select is not None:
        src.selected.js_on_change("indices", CustomJS(args={"select": select}, code=(
            "if (cb_obj.indices.length) select.value = String(cb_obj.indices[0]);")))
    return src, title, p


def _short(label: str, limit: int = 9) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "\u2026"


def bar_figure(slab: Slab, controls: SectionControls) -> list[Any]:
    """One bar per entry of the drawn axis (prompt tokens, modalities, ...), coloured by value."""
    labels = slab.drawn_labels[0]
    values = slab.slice(slab.default_index()).ravel()
    src = ColumnDataSource({"x": list(range(len(labels))), "label": labels, "value": values.astype(np.float64)},
                           name=f"{controls.prefix}:{slab.name}:bars")
    mapper = mapper_for(values)
    p = figure(x_range=Range1d(-0.6, len(labels) - 0.4), frame_width=min(760, max(220, 30 * len(labels))),
               frame_height=170, tools="hover,reset", toolbar_location=None,
               name=f"{controls.prefix}:{slab.name}:figure")
    _bare(p)
    p.ygrid.visible = True
    bars = p.vbar("x", 0.8, "value", source=src, fill_color=transform("value", mapper), line_color=None)
    p.hover.renderers = [bars]
    p.hover.tooltips = [(slab.drawn[0].replace("_", " "), "@label"), VALUE_TOOLTIP]
    p.hover.formatters = {"@value": "printf"}
    p.xaxis.ticker = list(range(len(labels)))
    p.xaxis.major_label_overrides = {i: _short(l, 12) for i, l in enumerate(labels)}
    if len(labels) > 6:
        p.xaxis.major_label_orientation = 0.9
    p.xaxis.axis_label = slab.drawn[0].replace("_", " ")
    Wired(slab, controls, src, mapper).wire()
    return [p]


def heatmap_figure(slab: Slab, controls: SectionControls) -> list[Any]:
    """The last two axes as a matrix (first axis down, second across), hover for values."""
    rows, cols = slab.values.shape[-2:]
    row_labels, col_labels = slab.drawn_labels
    r, c = np.divmod(np.arange(rows * cols), cols)
    values = slab.slice(slab.default_index()).ravel()
    src = ColumnDataSource({"x": c, "y": rows - 1 - r, "row": [row_labels[i] for i in r],
                            "col": [col_labels[j] for j in c], "value": values.astype(np.float64)},
                           name=f"{controls.prefix}:{slab.name}:cells")
    mapper = mapper_for(values)
    cell = int(np.clip(360 / max(cols, 1), 6, 36))
    p = figure(x_range=Range1d(-0.5, cols - 0.5), y_range=Range1d(-0.5, rows - 0.5), tools="hover,reset",
               frame_width=cell * cols, frame_height=int(np.clip(cell * rows, 40, 520)), toolbar_location=None,
               name=f"{controls.prefix}:{slab.name}:figure")
    _bare(p)
    cells = p.rect("x", "y", 1, 1, source=src, fill_color=transform("value", mapper), line_color=None)
    p.hover.renderers = [cells]
    a, b = (n.replace("_", " ") for n in slab.drawn)
    p.hover.tooltips = [(a, "@row"), (b, "@col"), VALUE_TOOLTIP]
    p.hover.formatters = {"@value": "printf"}
    p.xaxis.axis_label, p.yaxis.axis_label = b, a
    p.xaxis.ticker = _ticks(cols)
    p.yaxis.ticker = _ticks(rows)
    p.xaxis.major_label_overrides = {j: _short(col_labels[j], 10) for j in range(cols)}
    p.yaxis.major_label_overrides = {rows - 1 - i: _short(row_labels[i], 14) for i in range(rows)}
    p.add_layout(ColorBar(color_mapper=mapper, width=8, label_standoff=4), "right")
    Wired(slab, controls, src, mapper).wire()
    return [p]


GROUP_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf")
"""Colours of point groups in a scatter (matplotlib's tab10, so the static figure matches)."""


def scatter_figure(slab: Slab, controls: SectionControls, point_info: dict[str, list[str]],
                   group: str | None) -> list[Any]:
    """Points at (x, y) per slice, coloured by ``group`` (one of ``point_info``'s columns),
    hover showing every per-point column."""
    xy = slab.slice(slab.default_index()).astype(np.float64)
    data: dict[str, Any] = {"x": xy[:, 0], "y": xy[:, 1], **point_info}
    src = ColumnDataSource(data, name=f"{controls.prefix}:{slab.name}:points")
    x_label, y_label = (slab.drawn_labels[1] + ["x", "y"])[:2]
    p = figure(frame_width=420, frame_height=340, tools="hover,wheel_zoom,pan,reset", toolbar_location="right",
               name=f"{controls.prefix}:{slab.name}:figure", x_axis_label=x_label, y_axis_label=y_label)
    _bare(p)
    p.grid.visible = True
    kwargs: dict[str, Any] = {"fill_alpha": 0.75, "line_color": None, "size": 7}
    if group is not None:
        factors = sorted(set(point_info[group]))
        kwargs["fill_color"] = transform(group, CategoricalColorMapper(
            factors=factors, palette=[GROUP_COLOURS[i % len(GROUP_COLOURS)] for i in range(len(factors))]))
        kwargs["legend_field"] = group
    points = p.scatter("x", "y", source=src, **kwargs)
    p.hover.renderers = [points]
    p.hover.tooltips = [(k.replace("_", " "), f"@{{{k}}}") for k in point_info] + [("x", "@x{%0.4g}"), ("y", "@y{%0.4g}")]
    p.hover.formatters = {"@x": "printf", "@y": "printf"}
    if group is not None:
        p.legend.location = "top_left"
        p.legend.label_text_font_size = "10px"
        p.legend.background_fill_alpha = 0.6
    Wired(slab, controls, src, None, xy=True).wire()
    return [p]


def _ticks(n: int, most: int = 24) -> list[int]:
    step = max(1, -(-n // most))
    return list(range(0, n, step))
