"""Static matplotlib figures of each view: shown without JavaScript and when printing."""
from __future__ import annotations

import base64
import io
from typing import Sequence

import numpy as np
from PIL import Image

from .palettes import PLAIN, SIGNED, rgba
from .slabs import Slab, colour_range, is_signed

DPI = 110
PANEL_INCHES = 1.9
MAX_PANELS = 8
"""Most small multiples one static figure draws (answer tokens, stacked maps)."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _cmap(signed: bool, overlay: bool = False):
    """The page's own colour map for a slice (see-through at small magnitudes over an image)."""
    from matplotlib.colors import ListedColormap

    return ListedColormap(rgba(SIGNED if signed else PLAIN, overlay))


def _scale(values: np.ndarray) -> tuple[bool, float, float]:
    signed = is_signed(values)
    return (signed, *colour_range(values, signed))


def _encode(fig) -> str:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def panels(slab: Slab, axis_name: str | None) -> list[tuple[str, tuple[int, ...]]]:
    """(caption, index) of each small multiple: one per entry of ``axis_name`` (at most
    :data:`MAX_PANELS`, extra entries such as the whole answer first), else the default slice."""
    index = list(slab.default_index())
    fixed = [f"{a.title} {a.labels[i]}" for a, i in zip(slab.lead, index) if a.size > 1 and a.name != axis_name]
    i = slab.axis(axis_name) if axis_name else None
    if i is None:
        return [(", ".join(fixed), tuple(index))]
    axis = slab.lead[i]
    entries = list(range(axis.size))
    entries = [e for e in entries if e == axis.default] + [e for e in entries if e != axis.default]
    out = []
    for e in entries[:MAX_PANELS]:
        at = list(index)
        at[i] = e
        out.append((", ".join([axis.labels[e], *fixed]), tuple(at)))
    return out


def overlay_png(slab: Slab, image: Image.Image | None, region: tuple[float, float, float, float] | None,
                panel_axis: str | None = "answer_token") -> str:
    """The map over the image (or alone), one panel per answer token."""
    plt = _pyplot()
    chosen = panels(slab, panel_axis)
    width, height = image.size if image is not None else slab.values.shape[-1:-3:-1]
    aspect = height / width
    fig, axes = plt.subplots(1, len(chosen), figsize=(PANEL_INCHES * len(chosen), PANEL_INCHES * aspect + 0.4),
                             squeeze=False)
    top, left, bottom, right = region or (0.0, 0.0, 1.0, 1.0)
    for ax, (caption, index) in zip(axes[0], chosen):
        values = slab.slice(index)
        signed, lo, hi = _scale(values)
        if image is not None:
            ax.imshow(image, extent=(0, width, height, 0))
        ax.imshow(np.ma.masked_invalid(values), cmap=_cmap(signed, image is not None), vmin=lo, vmax=hi,
                  extent=(left * width, right * width, bottom * height, top * height), interpolation="nearest")
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_title(_clip(caption), fontsize=7)
        ax.axis("off")
    return _encode(fig)


def bar_png(slab: Slab) -> str:
    plt = _pyplot()
    chosen = panels(slab, "map" if slab.axis("map") is not None else None)[:4]
    labels = slab.drawn_labels[0]
    fig, axes = plt.subplots(len(chosen), 1, figsize=(min(9.0, 1.2 + 0.28 * len(labels)), 1.7 * len(chosen)),
                             squeeze=False)
    for ax, (caption, index) in zip(axes[:, 0], chosen):
        values = slab.slice(index)
        signed, lo, hi = _scale(values)
        cmap = _cmap(signed)
        colours = [cmap((v - lo) / (hi - lo)) if np.isfinite(v) else (0.85, 0.85, 0.85, 1) for v in values]
        ax.bar(range(len(values)), np.nan_to_num(values), color=colours)
        ax.set_xticks(range(len(labels)), [_clip(l, 12) for l in labels], rotation=60 if len(labels) > 6 else 0,
                      fontsize=7, ha="right" if len(labels) > 6 else "center")
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(_clip(caption, 90), fontsize=7)
        ax.axhline(0, color="#888888", linewidth=0.5)
    fig.tight_layout()
    return _encode(fig)


def heatmap_png(slab: Slab) -> str:
    plt = _pyplot()
    chosen = panels(slab, "map" if slab.axis("map") is not None else None)
    rows, cols = slab.values.shape[-2:]
    side = PANEL_INCHES * 1.1
    fig, axes = plt.subplots(1, len(chosen), figsize=(side * len(chosen), side * min(2.5, max(0.3, rows / cols)) + 0.5),
                             squeeze=False)
    row_labels, col_labels = slab.drawn_labels
    for ax, (caption, index) in zip(axes[0], chosen):
        values = slab.slice(index)
        signed, lo, hi = _scale(values)
        ax.imshow(np.ma.masked_invalid(values), cmap=_cmap(signed), vmin=lo, vmax=hi, aspect="auto",
                  interpolation="nearest")
        ax.set_title(_clip(caption, 40), fontsize=7)
        ax.set_xlabel(slab.drawn[1].replace("_", " "), fontsize=7)
        ax.set_ylabel(slab.drawn[0].replace("_", " "), fontsize=7)
        _ticks(ax.set_xticks, col_labels)
        _ticks(ax.set_yticks, row_labels)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    return _encode(fig)


def scatter_png(slab: Slab, groups: list[str] | None) -> str:
    """Points per slice, small multiples over the first leading axis (layers for projections)."""
    plt = _pyplot()
    chosen = panels(slab, slab.lead[0].name if slab.lead else None)
    fig, axes = plt.subplots(1, len(chosen), figsize=(PANEL_INCHES * len(chosen), PANEL_INCHES + 0.4), squeeze=False)
    factors = sorted(set(groups)) if groups else []
    colours = [f"C{factors.index(g) % 10}" for g in groups] if groups else "C0"
    for ax, (caption, index) in zip(axes[0], chosen):
        xy = slab.slice(index)
        ax.scatter(xy[:, 0], xy[:, 1], s=6, c=colours, alpha=0.75, linewidths=0)
        ax.set_title(_clip(caption, 40), fontsize=7)
        ax.tick_params(labelsize=6)
    if factors:
        handles = [plt.Line2D([], [], marker="o", linestyle="", color=f"C{i % 10}", label=_clip(f, 20))
                   for i, f in enumerate(factors)]
        fig.legend(handles=handles, fontsize=6, loc="lower center", ncol=min(5, len(factors)), frameon=False,
                   bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    return _encode(fig)


def _ticks(setter, labels: Sequence[str], most: int = 12) -> None:
    step = max(1, -(-len(labels) // most))
    picks = list(range(0, len(labels), step))
    setter(picks, [_clip(labels[i], 10) for i in picks])


def _clip(text: str, limit: int = 60) -> str:
    """Shortened, with ``$`` escaped: matplotlib would read model text between two as maths."""
    text = text if len(text) <= limit else text[: limit - 1] + "\u2026"
    return text.replace("$", r"\$")
