"""The masking toolkit: what a perturbed input looks like.

Baseline images (black, mean colour, blur, noise), pixel cells mapped to the image tokens that
cover them through the adapter's ``pixel_cell_map`` (so tiles and dynamic resolutions need no
special case), windows of cells, and text edits (dropping or replacing a question word), with
the batches of masked copies that :mod:`.forward` scores. Shared by occlusion, the minimal causal
set, gradients' baselines, the faithfulness curves and the audit's blank-image check.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from xmllm import MissingInput

from xmllm.explainers.prepared import Prepared
from .forward import (
    SHORTCUT_FAILURES,
    SHORTCUT_TOLERANCE,
    LogitRows,
    answer_ids,
    batched_logprobs,
    repeat_inputs,
    shared_prefix,
)
from .models.layout import ImageLayout, PatchGrid
from .params import ExplainerParams, ParamError, an_int, choice, param

BASELINES: tuple[str, ...] = ("black", "mean", "blur", "noise")
"""What an occluded cell shows: a black image, the image's mean colour, a blurred copy, noise."""


VIEWS: tuple[str, ...] = ("all", "main")
"""Which grids an occlusion reaches: every grid covering the region (all views of the image:
tiles, global view, base view) or only the main grid."""


BLUR_RADIUS_IN_CELLS = 0.5
"""Default Gaussian blur radius, in cells of the main grid: enough to erase detail within a cell."""


NOISE_LEVELS = 256
"""Pixel values 0..255 of the uniform noise image."""


TEXT_MODES: tuple[str, ...] = ("drop", "replace")


def cell_map(prep: Prepared) -> torch.Tensor:
    """The adapter's pixel -> image-token position map, on the pixels' device."""
    if "pixel_values" not in prep.inputs:
        raise MissingInput(f"sample {prep.sample.id!r} has no image: nothing to occlude")
    mapping = prep.adapter.pixel_cell_map(prep.inputs)
    pixels = prep.inputs["pixel_values"]
    if tuple(mapping.shape) != tuple(pixels.shape):
        raise ValueError(f"pixel_cell_map shape {tuple(mapping.shape)} != pixel_values shape {tuple(pixels.shape)}")
    return mapping.to(pixels.device)


def first_layout(prep: Prepared) -> ImageLayout:
    if not prep.layouts or not prep.layouts[0].grids:
        raise MissingInput(f"sample {prep.sample.id!r} has no image grid to occlude")
    return prep.layouts[0]


def scored_picture(prep: Prepared) -> int:
    """The picture (0-based) the metrics score: with several pictures, the sample's
    ``extra["evidence_image"]`` (1 = the first) where it names a mapped picture; else the first."""
    evidence = (prep.sample.extra or {}).get("evidence_image")
    if evidence is None or len(prep.sample.images) < 2:
        return 0
    k = int(evidence) - 1
    return k if any(layout.image_index == k and layout.grids for layout in prep.layouts) else 0


def scored_layout(prep: Prepared) -> ImageLayout:
    """The layout of :func:`scored_picture`: the grid the faithfulness curves and the ground truth use."""
    k = scored_picture(prep)
    return next(layout for layout in prep.layouts if layout.image_index == k) if k else first_layout(prep)


def scored_map_name(prep: Prepared) -> str:
    """The plain name of the scored picture's main-grid map (``image``, or ``image1.image`` for
    the second picture; see :func:`~xmllm.explainers.models.layout.grid_names`)."""
    k = scored_picture(prep)
    return "image" if k == 0 else f"image{k}.{scored_layout(prep).main_grid.name}"


def mapped_layouts(prep: Prepared) -> list[ImageLayout]:
    """Every image (or video frame) that has a grid, in input order: what a map over several
    pictures covers."""
    layouts = [layout for layout in prep.layouts if layout.grids]
    if not layouts:
        raise MissingInput(f"sample {prep.sample.id!r} has no image grid to occlude")
    return layouts


def region_of(grid: PatchGrid, rows: tuple[int, int], cols: tuple[int, int]) -> tuple[float, float, float, float]:
    """(top, left, bottom, right) image fractions of the cells ``rows[0]:rows[1]``, ``cols[0]:cols[1]``."""
    top, left, bottom, right = grid.region
    h, w = (bottom - top) / grid.rows, (right - left) / grid.cols
    return (top + rows[0] * h, left + cols[0] * w, top + rows[1] * h, left + cols[1] * w)


def cells_in_region(grid: PatchGrid, region: tuple[float, float, float, float]) -> torch.Tensor:
    """Positions of ``grid``'s cells whose centre lies in ``region`` (half-open), so every cell of
    a coarser or finer view is occluded by exactly one window of a tiling of the main grid."""
    top, left, bottom, right = grid.region
    ys = top + (torch.arange(grid.rows, dtype=torch.float64) + 0.5) * (bottom - top) / grid.rows
    xs = left + (torch.arange(grid.cols, dtype=torch.float64) + 0.5) * (right - left) / grid.cols
    inside = ((ys >= region[0]) & (ys < region[2]))[:, None] & ((xs >= region[1]) & (xs < region[3]))[None, :]
    return grid.positions.view(grid.rows, grid.cols)[inside]


def window_positions(layout: ImageLayout, rows: tuple[int, int], cols: tuple[int, int], views: str) -> torch.Tensor:
    """The image-token positions a window of the main grid occludes: its own cells, and with
    ``views="all"`` the cells of every other grid of the image over the same region."""
    main = layout.main_grid
    own = main.positions.view(main.rows, main.cols)[rows[0] : rows[1], cols[0] : cols[1]].flatten()
    if views == "main" or main.region is None:
        return own
    region = region_of(main, rows, cols)
    parts = [own] + [cells_in_region(g, region) for g in layout.grids if g is not main and g.region is not None]
    return torch.unique(torch.cat(parts))


@dataclass(frozen=True)
class Window:
    """A ``k x k`` (clipped) block of main-grid cells and the positions its occlusion reaches."""

    row: int
    col: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    positions: torch.Tensor

    def cells(self) -> list[tuple[int, int]]:
        return [(r, c) for r in range(*self.rows) for c in range(*self.cols)]


def _starts(size: int, window: int, stride: int) -> list[int]:
    """Window starts covering 0..size-1: every ``stride``, plus one flush with the end if needed."""
    last = max(0, size - window)
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts


def windows(layout: ImageLayout, window: int, stride: int, views: str) -> list[Window]:
    grid = layout.main_grid
    k_r, k_c = min(window, grid.rows), min(window, grid.cols)
    out = []
    for r in _starts(grid.rows, k_r, stride):
        for c in _starts(grid.cols, k_c, stride):
            rows, cols = (r, r + k_r), (c, c + k_c)
            out.append(Window(r, c, rows, cols, window_positions(layout, rows, cols, views)))
    return out


def baseline_images(images: Sequence[Image.Image], kind: str, seed: int, blur_radius: float) -> list[Image.Image]:
    """What each image looks like fully occluded, as an image the processor can read."""
    rng = np.random.default_rng(seed)
    out = []
    for image in images:
        rgb = image.convert("RGB")
        if kind == "black":
            out.append(Image.new("RGB", rgb.size, (0, 0, 0)))
        elif kind == "mean":
            colour = np.asarray(rgb, dtype=np.float64).reshape(-1, 3).mean(axis=0)
            out.append(Image.new("RGB", rgb.size, tuple(int(round(v)) for v in colour)))
        elif kind == "blur":
            out.append(rgb.filter(ImageFilter.GaussianBlur(blur_radius)))
        else:  # noise
            noise = rng.integers(0, NOISE_LEVELS, size=(rgb.height, rgb.width, 3), dtype=np.uint8)
            out.append(Image.fromarray(noise, "RGB"))
    return out


def default_blur_radius(prep: Prepared) -> float:
    """Half a main-grid cell, in pixels of the original image."""
    return blur_radius_for(prep, None)


def blur_radius_for(prep: Prepared, blur_radius: float | None) -> float:
    """``blur_radius`` checked, or by default half a main-grid cell in pixels of the original image."""
    if blur_radius is not None:
        if isinstance(blur_radius, bool) or not isinstance(blur_radius, (int, float)) or not blur_radius > 0:
            raise ParamError(f"parameter blur_radius={blur_radius!r} must be a number of pixels > 0")
        return float(blur_radius)
    grid = first_layout(prep).main_grid
    image = prep.sample.images[0]
    return BLUR_RADIUS_IN_CELLS * max(image.height / grid.rows, image.width / grid.cols)


def baseline_pixels(prep: Prepared, kind: str, seed: int = 0, blur_radius: float | None = None) -> torch.Tensor:
    """``pixel_values`` of the baseline images, through the model's own processor, so that a
    "black" cell is exactly what the model sees of black pixels, whatever its normalisation."""
    kind = choice("baseline", kind, BASELINES)
    images = baseline_images(prep.sample.images, kind, an_int("seed", seed), blur_radius_for(prep, blur_radius))
    inputs, _ = prep.adapter.build_inputs(images, prep.sample.question)
    pixels = prep.inputs["pixel_values"]
    base = inputs["pixel_values"].to(device=pixels.device, dtype=pixels.dtype)
    if base.shape != pixels.shape:
        raise ValueError(f"baseline {kind!r}: processed shape {tuple(base.shape)} != {tuple(pixels.shape)}")
    return base


class PixelCells:
    """Which pixel values feed which image token, indexed once so that occluding a cell touches only
    its own pixels.

    Built from the adapter's ``pixel_cell_map`` (each pixel value -> the sequence position of the
    image token covering it): the pixel indices sorted by position make every position's pixels
    one contiguous run, so a copy with some cells occluded costs a copy of the image plus the
    occluded pixels, not a pass over every pixel per copy.
    """

    def __init__(self, mapping: torch.Tensor) -> None:
        flat = mapping.flatten()
        self.shape = tuple(mapping.shape)
        self.order = torch.argsort(flat, stable=True)
        self.sorted = flat[self.order].contiguous()

    def of(self, positions: torch.Tensor) -> torch.Tensor:
        """Flat indices of the pixel values feeding any of ``positions``."""
        wanted = torch.unique(positions.to(self.sorted.device).long())
        low = torch.searchsorted(self.sorted, wanted).tolist()
        high = torch.searchsorted(self.sorted, wanted, right=True).tolist()
        runs = [self.order[a:b] for a, b in zip(low, high) if b > a]
        return torch.cat(runs) if runs else self.order[:0]

    def masked(self, pixels: torch.Tensor, baseline: torch.Tensor, position_sets: Sequence[torch.Tensor]) -> torch.Tensor:
        """One copy of ``pixels`` per position set, those positions' pixels set to the baseline,
        concatenated along dim 0 (the layout :func:`repeat_inputs` gives the other inputs)."""
        if tuple(pixels.shape) != self.shape or tuple(baseline.shape) != self.shape:
            raise ValueError(f"pixels {tuple(pixels.shape)} / baseline {tuple(baseline.shape)} != cell map {self.shape}")
        copies = pixels.reshape(1, -1).repeat(len(position_sets), 1)
        source = baseline.reshape(-1)
        for row, positions in zip(copies, position_sets):
            index = self.of(positions)
            row[index] = source[index]
        return copies.view(len(position_sets) * self.shape[0], *self.shape[1:])


def pixel_batches(prep: Prepared, baseline: torch.Tensor, cells: PixelCells,
                  position_sets: Sequence[torch.Tensor]) -> Callable[[int, int], dict[str, Any]]:
    """``make_batch`` for :func:`batched_logprobs`: copy i has ``position_sets[i]`` occluded."""
    inputs = dict(prep.inputs)
    pixels = inputs["pixel_values"]

    def make(start: int, stop: int) -> dict[str, Any]:
        batch = repeat_inputs(inputs, stop - start)
        batch["pixel_values"] = cells.masked(pixels, baseline, position_sets[start:stop])
        return batch

    return make


def occluded_logprobs(prep: Prepared, baseline: torch.Tensor, cells: PixelCells,
                      position_sets: Sequence[torch.Tensor], batch_size: int, reference: torch.Tensor,
                      *, prefix_cache: bool = True, logit_rows: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """The answer tokens' log-probabilities with each set of positions occluded: (sets, T), and
    which shortcuts scored them (``prefix_tokens``, ``logit_rows_only``) in how many ``forwards``.

    Shortcuts are checked, not assumed: the first forward also scores the unoccluded image, and
    only if that row matches ``reference`` (the plain forward's log-probabilities) within
    :data:`SHORTCUT_TOLERANCE` do the shortcuts score the rest; otherwise every copy runs plainly.
    """
    ids = answer_ids(prep)
    unoccluded = torch.empty(0, dtype=torch.long)
    make = pixel_batches(prep, baseline, cells, [unoccluded, *position_sets])  # copy 0: the check

    def after(first: int) -> Callable[[int, int], dict[str, Any]]:
        return lambda start, stop: make(start + first, stop + first)

    def forwards(count: int, size: int) -> int:
        return -(-count // size)

    prefix = shared_prefix(prep) if prefix_cache else None
    ran = 0 if prefix is None else 1
    rows = LogitRows.of(prep) if logit_rows else None
    if prefix is not None or rows is not None:
        first = min(len(position_sets), batch_size - 1) + 1  # the check copy counts against the batch
        ran += 1
        try:
            head = batched_logprobs(prep.model, first, make, first, prep.logit_positions, ids, prefix, rows)
        except SHORTCUT_FAILURES:
            head = None
        if head is not None and head.shape[1:] == reference.shape and bool(
                ((head[0] - reference).abs() <= SHORTCUT_TOLERANCE).all()):
            parts = [head[1:]]
            if len(position_sets) + 1 > first:
                parts.append(batched_logprobs(prep.model, len(position_sets) + 1 - first, after(first), batch_size,
                                              prep.logit_positions, ids, prefix, rows))
            ran += forwards(len(position_sets) + 1 - first, batch_size)
            return torch.cat(parts), {"prefix_tokens": prefix.length if prefix else 0,
                                      "logit_rows_only": rows is not None, "forwards": ran}
    plain = batched_logprobs(prep.model, len(position_sets), after(1), batch_size, prep.logit_positions, ids)
    ran += forwards(len(position_sets), batch_size)
    return plain, {"prefix_tokens": 0, "logit_rows_only": False, "forwards": ran}


def _find(haystack: list[int], needle: list[int]) -> list[int]:
    n = len(needle)
    return [i for i in range(len(haystack) - n + 1) if n and haystack[i : i + n] == needle]


def question_positions(prep: Prepared) -> list[int]:
    """Positions of the question's own tokens in the prompt (not template or special tokens).

    Found by tokenising the question alone and locating that id sequence in the prompt; BPE
    tokenisers may merge the first word with a preceding space, so the space-prefixed form is
    tried too, then the match without the first token (whose merge depends on context). The last
    occurrence wins: templates put the question after any system text.
    """
    tok = prep.loaded.processor.tokenizer
    question = prep.sample.question
    prompt = prep.inputs["input_ids"][0, : int(prep.answer_positions[0])].tolist()
    allowed = set(prep.text_positions.tolist()) - {
        i for i, t in enumerate(prompt) if t in set(tok.all_special_ids)
    }
    forms = [tok(text, add_special_tokens=False)["input_ids"] for text in (question, " " + question, question.strip())]
    for ids in forms:
        hits = _find(prompt, ids)
        if hits:
            start = hits[-1]
            return [p for p in range(start, start + len(ids)) if p in allowed]
    for ids in forms:
        hits = _find(prompt, ids[1:]) if len(ids) > 1 else []
        if hits:
            start = hits[-1]
            first = tok.decode([ids[0]]).strip()
            before = tok.decode([prompt[start - 1]]).strip() if start > 0 else ""
            lead = [start - 1] if first and before and (before.endswith(first) or first.endswith(before)) else []
            return [p for p in [*lead, *range(start, start + len(ids) - 1)] if p in allowed]
    raise ValueError(f"sample {prep.sample.id!r}: cannot locate the question's tokens in the prompt")


def replacement_id(prep: Prepared, replacement: int | str | None) -> int:
    """The token id that stands in for an ablated word: given, else unk, else pad."""
    tok = prep.loaded.processor.tokenizer
    if replacement is None:
        for candidate in (tok.unk_token_id, tok.pad_token_id):
            if candidate is not None:
                return int(candidate)
        raise ParamError("parameter replacement=None: the tokenizer has neither an unk nor a pad token; pass one")
    if isinstance(replacement, str):
        ids = tok.convert_tokens_to_ids([replacement])
        if not ids or ids[0] is None or (ids[0] == tok.unk_token_id and replacement != tok.unk_token):
            raise ParamError(f"parameter replacement={replacement!r} is not a single token of the tokenizer")
        return int(ids[0])
    if isinstance(replacement, bool) or not isinstance(replacement, (int, np.integer)) or not (
        0 <= int(replacement) < len(tok)
    ):
        raise ParamError(f"parameter replacement={replacement!r} must be a token string or an id below {len(tok)}")
    return int(replacement)


def per_token_keys(prep: Prepared) -> list[str]:
    """Inputs aligned with ``input_ids`` (the adapter declares which), to edit along with it."""
    ids = prep.inputs["input_ids"]
    keys = ["input_ids"]
    for key in prep.adapter.per_token_fill:
        value = prep.inputs.get(key)
        if torch.is_tensor(value) and value.shape == ids.shape:
            keys.append(key)
    return keys


def edited_inputs(prep: Prepared, position: int, mode: str, replacement: int) -> dict[str, Any]:
    """The final sequence's inputs with the token at ``position`` dropped or replaced (one row)."""
    inputs = dict(prep.inputs)
    for key in per_token_keys(prep):
        value = inputs[key]
        if mode == "drop":
            inputs[key] = torch.cat([value[:, :position], value[:, position + 1 :]], dim=1)
        elif key == "input_ids":
            value = value.clone()
            value[:, position] = replacement
            inputs[key] = value
    return inputs


def text_batches(prep: Prepared, positions: Sequence[int], mode: str,
                 replacement: int) -> Callable[[int, int], dict[str, Any]]:
    """``make_batch``: copy i has the token at ``positions[i]`` dropped or replaced. Drops all
    shorten the sequence by one, so they batch too."""
    keys = per_token_keys(prep)

    def make(start: int, stop: int) -> dict[str, Any]:
        rows = [edited_inputs(prep, p, mode, replacement) for p in positions[start:stop]]
        batch = repeat_inputs({k: v for k, v in rows[0].items() if k not in keys}, len(rows))
        for key in keys:
            batch[key] = torch.cat([row[key] for row in rows], dim=0)
        return batch

    return make


@dataclass(frozen=True)
class MaskingParams(ExplainerParams):
    """What masked copies of the image show and how many share a forward: the parameters of every
    explainer that masks image cells (occlusion, the minimal causal set), declared once."""

    baseline: str = param("black", "what masked cells show", choices=BASELINES)
    batch_size: int | None = param(None, "masked copies per forward (null: as many as the memory budget fits)",
                                   low=1)
    seed: int = param(0, "seed of the noise baseline")
    blur_radius: float | None = param(None, "blur baseline's radius in pixels (null: half a grid cell)",
                                      low=0.0, low_open=True)
    views: str = param("all", "mask a cell in every grid of every image, or only in each image's main grid",
                       choices=VIEWS)
    fast_attention: bool = param(True, "run the masked forwards with the fused attention kernel")

