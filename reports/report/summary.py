"""The "why" panel at the top of every report: what a reader wants before the details.

- the answer, whether it was cut, warnings and skipped explainers;
- one small map per image explainer, side by side over the image, each on its own colour scale
  with a colour bar (maps of different explainers are in different units);
- how much the explainers agree: the Spearman rank correlation of every pair of maps;
- what explainers found, in words, each as its class's ``why`` says it (the causal set's:
  "masking these 3 cells turns *purple* into *blue*");
- maps whose largest value is near numerical noise, with the parameter to change.

Everything here is computed from the run alone (no model), so cached runs re-render. What differs
by explainer (its hint, whether its map ranks cells, its sentence) is read from its class, so the
panel keeps no table of explainers.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from xmllm.explainers.registry import Explainer

NOISE_FLOOR = 1e-3
"""Largest |value| under which an image map is called near numerical noise: for log-probability
changes and their gradients this is a thousandth of a nat, far below any answer-level effect."""
GENERIC_HINT = "explain a contrast (--contrast OTHER) or change this explainer's parameters (xmllm explainers ID)"
"""What to change when a map is near noise and its explainer declares no ``noise_hint`` of its own."""
THUMB = 150
"""Pixels of each small map's side."""


@dataclass
class MapThumb:
    explainer: str
    map_name: str
    png: str
    """A data: URI of the map over the image, with its colour bar."""
    low: float
    high: float
    noise: str | None = None
    """When the map is near numerical noise: what to change."""


@dataclass
class ImageStrip:
    """One explainer's maps over every image (or frame) on one colour scale, and each one's share."""

    explainer: str
    map_name: str
    png: str
    labels: list[str]
    shares: list[float]
    carrier: int


@dataclass
class Finding:
    """One explainer's sentence for the panel: what its explanation found, linked to its section."""

    explainer: str
    text: str


@dataclass
class WhyPanel:
    answer: str
    cut: bool
    limit: int | None
    given: bool
    contrast: str | None
    warnings: list[str]
    skipped: dict[str, str]
    thumbs: list[MapThumb] = field(default_factory=list)
    agreement: dict[str, Any] | None = None
    """``labels`` and the ``matrix`` of Spearman correlations (None with fewer than two maps)."""
    strips: list[ImageStrip] = field(default_factory=list)
    """With several images or frames: each image explainer's strip and shares."""
    carried: str | None = None
    """Which image or frame carried the answer, in words, where the explainers with shares say."""
    causal: list[Finding] = field(default_factory=list)
    """Every explainer's :meth:`~xmllm.explainers.registry.Explainer.why` sentence, in run order (of
    the built-ins, the minimal causal set says one)."""


def _thumb(values: np.ndarray, image: "Image.Image | None", region: Any) -> tuple[str, float, float]:
    """The map over the image, with a colour bar, as a PNG data URI.

    Drawn as the sections' overlays are (:func:`xmllm.report.static.overlay_png`): the whole image,
    the map laid over its region (fractions ``top, left, bottom, right``) in the see-through overlay
    colours, so the hot cells sit on the object under them. Without an image or a known region the
    grid is drawn alone, one square per cell.
    """
    from .static import _cmap, _pyplot, _scale

    plt = _pyplot()
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    signed, vmin, vmax = _scale(values)  # the page's own colour rule and maps, as its overlays use
    fig, ax = plt.subplots(figsize=(2.0, 1.7), dpi=THUMB / 2.0)
    over = image is not None and region is not None
    if over:
        width, height = image.size
        top, left, bottom, right = (float(v) for v in region)
        ax.imshow(np.asarray(image.convert("RGB")), extent=(0, width, height, 0))
        extent = (left * width, right * width, bottom * height, top * height)
    else:
        height, width = values.shape[-2:]
        extent = (0, width, height, 0)
    mapped = ax.imshow(np.ma.masked_invalid(values), cmap=_cmap(signed, over), vmin=vmin, vmax=vmax,
                       extent=extent, interpolation="nearest")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    bar = fig.colorbar(mapped, ax=ax, fraction=0.08, pad=0.03)
    bar.ax.tick_params(labelsize=5)
    bar.formatter.set_powerlimits((-2, 3))
    bar.update_ticks()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.02, metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), low, high


def picture_labels(run: Any) -> list[str]:
    """What each input picture is called: a video's frames by index and time, else "image k"."""
    video = run.manifest.get("video") or {}
    frames = video.get("frames") or []
    if frames and len(frames) == len(run.images):
        return [f"frame {f['index']} ({f['time']:.2f} s)" for f in frames]
    return [f"image {k + 1}" for k in range(len(run.images))]


def _strip(shares: Any, images: list[Any], regions: list[Any], labels: list[str]) -> str:
    """Every picture with its map on one shared colour scale, and a bar of each one's share, as a
    PNG data URI (drawn as :func:`_thumb` draws one picture)."""
    from .static import _cmap, _pyplot, _scale

    plt = _pyplot()
    n = len(images)
    columns = min(n, 8)
    rows = -(-n // columns)
    stacked = np.concatenate([np.ravel(m) for m in shares.maps])
    signed, vmin, vmax = _scale(stacked)
    fig = plt.figure(figsize=(1.5 * columns + 0.6, 1.5 * rows + 1.1), dpi=100)
    grid = fig.add_gridspec(rows + 1, columns, height_ratios=[1.0] * rows + [0.45])
    mapped = None
    for k, (image, values, region) in enumerate(zip(images, shares.maps, regions)):
        ax = fig.add_subplot(grid[k // columns, k % columns])
        width, height = image.size
        ax.imshow(np.asarray(image.convert("RGB")), extent=(0, width, height, 0))
        top, left, bottom, right = (float(v) for v in (region or (0.0, 0.0, 1.0, 1.0)))
        mapped = ax.imshow(np.ma.masked_invalid(values), cmap=_cmap(signed, True), vmin=vmin, vmax=vmax,
                           extent=(left * width, right * width, bottom * height, top * height), interpolation="nearest")
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_axis_off()
        ax.set_title(labels[k] + (" \u2190" if k == shares.carrier else ""), fontsize=7)
    bars = fig.add_subplot(grid[rows, :])
    colours = ["#d62728" if k == shares.carrier else "#7f7f7f" for k in range(n)]
    bars.bar(range(n), shares.shares, color=colours)
    bars.set_xticks(range(n), [str(k + 1) for k in range(n)], fontsize=6)
    bars.set_ylim(0, 1)
    bars.set_ylabel("share", fontsize=7)
    bars.tick_params(labelsize=6)
    if mapped is not None:
        bar = fig.colorbar(mapped, ax=fig.axes[:n], fraction=0.02, pad=0.01)
        bar.ax.tick_params(labelsize=5)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.02, metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _main_regions(run: Any) -> list[Any]:
    regions: list[Any] = [None] * len(run.images)
    for layout in run.manifest.get("layouts") or []:
        k = int(layout.get("image", -1))
        for grid in layout.get("grids") or []:
            if 0 <= k < len(regions) and grid.get("main"):
                regions[k] = grid.get("region")
    return regions


def _strips(run: Any, panel: "WhyPanel") -> None:
    """The strips and the sentence saying which picture carried the answer (several pictures only)."""
    from xmllm.explainers.metrics.image_shares import image_shares

    if len(run.images) < 2:
        return
    labels = picture_labels(run)
    regions = _main_regions(run)
    for exp in run.explanations:
        shares = image_shares(exp, run.manifest.get("layouts"), len(run.images))
        if shares is None or not _declared(exp.explainer).ranks_cells:
            continue
        panel.strips.append(ImageStrip(exp.explainer, shares.base, _strip(shares, run.images, regions, labels),
                                       labels, [round(v, 4) for v in shares.shares], shares.carrier))
    if panel.strips:
        votes = [st.carrier for st in panel.strips]
        top = max(set(votes), key=votes.count)
        agree = [st for st in panel.strips if st.carrier == top]
        panel.carried = (f"{labels[top][0].upper() + labels[top][1:]} carried the answer by {len(agree)} of "
                         f"{len(panel.strips)} explainers' maps (largest share: "
                         + ", ".join(f"{st.explainer} {st.shares[top]:.0%}" for st in agree) + ")")


def _region(run: Any) -> Any:
    """Where the first image's main grid lies on it (fractions), as the sections place their maps:
    the whole image when the run records no layouts, None when it records them but not this one."""
    layouts = run.manifest.get("layouts") or []
    for layout in layouts:
        for grid in layout.get("grids") or []:
            if grid.get("main") and layout.get("image") == 0:
                return grid.get("region")
    return None if layouts else (0.0, 0.0, 1.0, 1.0)


def _declared(explainer_id: str) -> "type[Explainer]":
    """The class that declares how ``explainer_id`` is shown; the base class's defaults for an id no
    longer registered (a cached run of a removed or renamed explainer still renders)."""
    from xmllm.explainers.registry import Explainer, registered

    return registered().get(explainer_id, Explainer)


def why_panel(run: Any) -> WhyPanel:
    """The panel's content for ``run`` (see the module docstring)."""
    from xmllm.explainers.metrics import primary_image_map
    from xmllm.explainers.metrics.stats import spearman

    answer = run.manifest.get("answer") or {}
    contrast = (run.manifest.get("contrast") or {}).get("text")
    panel = WhyPanel(
        answer=str(answer.get("text", "")), cut=answer.get("stopped") == "length", limit=answer.get("max_new_tokens"),
        given=answer.get("stopped") == "given", contrast=contrast,
        warnings=[str(w) for w in run.manifest.get("warnings") or []],
        skipped={str(k): str(v) for k, v in (run.manifest.get("skipped") or {}).items()},
    )
    image = run.images[0] if run.images else None
    region = _region(run)
    maps: dict[str, np.ndarray] = {}
    for exp in run.explanations:
        scored = primary_image_map(exp)
        if scored is None or not np.isfinite(scored.values).all():
            continue
        values = np.asarray(scored.values, dtype=np.float64)
        maps[exp.explainer] = values
        uri, low, high = _thumb(values, image, region)
        noise = None
        declared = _declared(exp.explainer)
        if declared.ranks_cells and max(abs(low), abs(high)) < NOISE_FLOOR:
            noise = (f"largest value {max(abs(low), abs(high)):.1e}, near numerical noise: "
                     + (declared.noise_hint or GENERIC_HINT))
        panel.thumbs.append(MapThumb(exp.explainer, scored.describe(), uri, low, high, noise))
    labels = [k for k in maps if _declared(k).ranks_cells]
    if len(labels) >= 2 and len({maps[k].shape for k in labels}) == 1:
        matrix = [[round(spearman(maps[a], maps[b]), 2) for b in labels] for a in labels]
        pairs = [(matrix[i][j], labels[i], labels[j]) for i in range(len(labels)) for j in range(i + 1, len(labels))]
        panel.agreement = {"labels": labels, "matrix": matrix, "lowest": min(pairs), "highest": max(pairs)}
    _strips(run, panel)
    for exp in run.explanations:
        sentence = _declared(exp.explainer).why(exp)
        if sentence:
            panel.causal.append(Finding(exp.explainer, sentence))
    return panel
