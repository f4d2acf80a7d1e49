"""Perturbation explainers: occlude image cells or ablate question words, re-run the model, measure.

Every number here comes from a real, teacher-forced forward of the final sequence (prompt +
answer): one forward gives every answer token's log-probability at once, and many perturbed
copies share one batched forward. A cell is occluded in pixel space through the adapter's
``pixel_cell_map`` (each pixel value -> the sequence position of the image token covering
it), so the same code serves every family, tiles and dynamic resolutions included.

The helpers below (baselines, cell masks, batched scoring, question positions) are shared
with :mod:`xmllm.explainers.methods.causal`.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from ..capture import attn_implementations
from ..context import Prepared, score_tokens
from ..explanation import Explanation
from ..hooks import Hooks
from ..memory import copies_within, forward_copy_bytes, uses_eager
from ..models import LoadedModel
from ..models.layout import ImageLayout, PatchGrid
from ..params import ExplainerParams, param
from ..registry import Citation, Explainer, register

FAMILY = "perturbation"
BASELINES: tuple[str, ...] = ("black", "mean", "blur", "noise")
"""What an occluded cell shows: a black image, the image's mean colour, a blurred copy, noise."""
VIEWS: tuple[str, ...] = ("all", "main")
"""Which grids an occlusion reaches: every grid covering the region (all views of the image:
tiles, global view, base view) or only the main grid."""
SHORTCUT_TOLERANCE = 1e-4
"""Largest |difference| allowed between the unperturbed answer log-probabilities of a plain forward
and of one through the shortcuts (shared prefix cache, logit rows only) before these are trusted
(float32 forwards differ by ~1e-6); a family whose forward does not resume from a cache, or whose
last block is not row-wise after attention, fails this and runs every copy plainly."""
SHORTCUT_FAILURES = (TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError, NotImplementedError)
"""What a family whose forward cannot take a shortcut raises: that family scores plainly."""
CACHE_KEYWORDS: tuple[str, ...] = ("cache", "past_key_values")
"""What a model's ``forward`` calls its key/value cache argument (transformers 5, then 4)."""
BLUR_RADIUS_IN_CELLS = 0.5
"""Default Gaussian blur radius, in cells of the main grid: enough to erase detail within a cell."""
NOISE_LEVELS = 256
"""Pixel values 0..255 of the uniform noise image."""
TEXT_MODES: tuple[str, ...] = ("drop", "replace")
FUSED_KERNEL = "sdpa"
"""The attention kernel perturbation forwards run with: they never need attention weights."""

SIGN_NOTE = "drop = log p(original input) - log p(perturbed input); positive means the part supported the answer"

ZEILER_FERGUS = Citation(
    "Visualizing and Understanding Convolutional Networks", 2013, "1311.2901", "Zeiler, Fergus"
)


# --- parameters ------------------------------------------------------------------------------------


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1, or a one-line error naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"parameter {name}={value!r} must be an integer >= 1")
    return int(value)


def an_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"parameter {name}={value!r} must be an integer")
    return int(value)


def choice(name: str, value: Any, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"parameter {name}={value!r} must be one of {', '.join(options)}")
    return str(value)


# --- batched scoring -------------------------------------------------------------------------------


def _uses_only(found: Mapping[str, Any], kernel: str) -> bool:
    return all(_uses_only(v, kernel) if isinstance(v, Mapping) else v in (kernel, None) for v in found.values())


@contextmanager
def fused_attention(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run the block with the fused attention kernel, then restore the model's own.

    A model loaded with eager attention (for attention explainers) would otherwise pay for
    materialised attention matrices in every perturbed forward; a model without the fused kernel
    keeps its own.
    """
    before = attn_implementations(model.config)
    switched = False
    if enabled and hasattr(model, "set_attn_implementation") and not _uses_only(before, FUSED_KERNEL):
        try:
            model.set_attn_implementation(FUSED_KERNEL)
            switched = True
        except (ValueError, ImportError, NotImplementedError):
            switched = False
    try:
        yield
    finally:
        if switched:
            model.set_attn_implementation(before)


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def repeat_inputs(inputs: Mapping[str, Any], copies: int) -> dict[str, Any]:
    """``copies`` copies of a one-row input, concatenated along dim 0.

    For inputs with a batch axis (ids, masks, LLaVA-NeXT's patches) that is the batch; for those
    without one (LLaVA's or Qwen's per-image pixels and grid sizes) the copies' images follow
    each other in batch order, which is how the models read them.
    """
    return {k: v.repeat(copies, *([1] * (v.dim() - 1))) if torch.is_tensor(v) else v for k, v in inputs.items()}


@dataclass(frozen=True)
class SharedPrefix:
    """The decoder's keys and values of the tokens before the first image token, computed once.

    Occlusion changes pixels only, so every occluded copy shares this prefix token for token;
    each batched forward then runs just the rest of the sequence on a batch-wide copy of the cache
    instead of recomputing the prefix per copy. That removes the prefix rows' matrix work; the
    attention of the rest still reads the prefix keys, through an explicit mask where a full
    forward uses the kernel's cheaper causal flag, so on an attention-bound model (the narrow
    576-token bench model, 343 prefix tokens) the two cost the same. Built by
    :func:`shared_prefix`; trusted only once a resumed forward has reproduced the full forward
    (see :func:`occluded_logprobs`).
    """

    length: int
    cache: Any
    keyword: str
    seq_len: int

    def resume(self, inputs: Mapping[str, Any], logit_positions: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
        """Inputs for the tokens after the prefix (per-token tensors cut, the attention mask kept
        whole as the cache needs), a cache copy per row, and the logit positions shifted."""
        rows = int(inputs["input_ids"].shape[0])
        out = {k: v[:, self.length :] if _per_token(k, v, rows, self.seq_len) else v for k, v in inputs.items()}
        cache = copy.deepcopy(self.cache)
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        out[self.keyword] = _prefix_only(cache)
        out["use_cache"] = True
        return out, logit_positions - self.length


def _prefix_only(cache: Any) -> Any:
    """``cache`` made to hand each block the prefix's keys and values followed by the new tokens'
    without keeping the new ones: a resumed forward is never resumed again, and a cache that
    grew would hold every block's keys and values of every copy until the forward ends (on
    LLaVA-1.5-7B, 32 copies of 640 tokens: 10 GiB at full depth). The same tensors reach the
    attention either way; only plain growing layers are changed (others keep their own update)."""
    from transformers.cache_utils import DynamicLayer

    for layer in getattr(cache, "layers", ()):
        if type(layer) is not DynamicLayer:
            continue

        def update(key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, layer: Any = layer,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not layer.is_initialized:  # a block with nothing cached: its keys are the new ones
                return key_states, value_states
            return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)

        layer.update = update
    return cache


def _per_token(key: str, value: Any, rows: int, seq_len: int) -> bool:
    return (key != "attention_mask" and torch.is_tensor(value) and value.dim() >= 2
            and tuple(value.shape[:2]) == (rows, seq_len))


class LogitRows:
    """The last decoder block's work after its attention, run on the rows whose logits are read only.

    After the last block's attention every operation (its output projection, norms, MLP, then the
    final norm and LM head) acts on each row alone, and no later block reads the other rows. So
    the attention output projection and the MLP of that block run on the logit rows only and the
    other rows carry zeros that nothing reads: the kept rows are the same modules on the same
    inputs, so the result is exact, and a teacher-forced forward skips about a sixth of the
    decoder's work per copy on the demo model. Built by :meth:`of` from the adapter's hook points.
    """

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        self.modules = tuple(modules)

    @classmethod
    def of(cls, prep: Prepared) -> LogitRows | None:
        """The last block's ``.attn.out`` and ``.mlp`` points, or None where the adapter lacks one."""
        points = prep.adapter.hook_points()
        last = len(prep.adapter.decoder_layers()) - 1
        names = (f"decoder.blocks.{last}.attn.out", f"decoder.blocks.{last}.mlp")
        if last < 0 or any(name not in points for name in names):
            return None
        return cls([points[name] for name in names])

    @contextmanager
    def only(self, rows: torch.Tensor, seq_len: int) -> Iterator[None]:
        """Within the block, the modules read rows ``rows`` of their (batch, ``seq_len``, d) input
        and write them back into a zero (batch, ``seq_len``, d_out) output."""

        def cut(module: torch.nn.Module, args: tuple) -> tuple:
            hidden = args[0] if args else None
            if not (torch.is_tensor(hidden) and hidden.dim() == 3 and hidden.shape[1] == seq_len):
                raise RuntimeError(f"{type(module).__name__} input is not (batch, {seq_len}, hidden): rows not cut")
            return (hidden.index_select(1, rows), *args[1:])

        def scatter(module: torch.nn.Module, args: tuple, output: Any) -> torch.Tensor:
            if not torch.is_tensor(output):
                raise RuntimeError(f"{type(module).__name__} returns {type(output).__name__}, not a tensor")
            return output.new_zeros(output.shape[0], seq_len, output.shape[-1]).index_copy_(1, rows, output)

        with Hooks() as hooks:
            for module in self.modules:
                hooks.add(module.register_forward_pre_hook(cut))
                hooks.add(module.register_forward_hook(scatter))
            yield


def logprobs_at(model: torch.nn.Module, inputs: Mapping[str, Any], logit_positions: torch.Tensor,
                token_ids: torch.Tensor | None, prefix: SharedPrefix | None = None,
                rows: LogitRows | None = None) -> torch.Tensor:
    """One forward; log-softmax at ``logit_positions``: (batch, T, vocab), or with ``token_ids``
    the log-probability of token t at position t: (batch, T). With ``prefix`` the forward starts
    after the shared prefix (positions stay those of the whole sequence); with ``rows`` the last
    block's post-attention work runs on the logit rows only."""
    call: dict[str, Any] = {**inputs, "use_cache": False}
    if prefix is not None:
        call, logit_positions = prefix.resume(inputs, logit_positions)
    ids = call["input_ids"]
    pos = logit_positions.to(ids.device)
    keep = _accepts_logits_to_keep(model)
    if keep:
        call["logits_to_keep"] = pos
    with rows.only(pos, int(ids.shape[1])) if rows is not None else contextlib.nullcontext():
        logits = model(**call).logits
    if not keep:
        logits = logits[:, pos]
    logp = torch.log_softmax(logits.float(), dim=-1)
    if token_ids is None:
        return logp
    return score_tokens(logp, token_ids)


def _cache_keyword(model: torch.nn.Module) -> str | None:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((k for k in CACHE_KEYWORDS if k in params), None)


def first_image_position(prep: Prepared) -> int | None:
    """The first sequence position that depends on pixels (None without an image)."""
    parts = [layout.all_positions for layout in prep.layouts]
    parts = [p for p in parts if p.numel()]
    return int(torch.cat(parts).min()) if parts else None


@torch.inference_mode()
def shared_prefix(prep: Prepared) -> SharedPrefix | None:
    """The prefix cache for pixel perturbations of ``prep``, or None where it does not apply: no
    tokens before the first image token, or a forward without a cache argument. Not yet trusted:
    :func:`occluded_logprobs` checks a resumed forward against the full one before using it."""
    keyword = _cache_keyword(prep.model)
    start = first_image_position(prep)
    ids = prep.inputs["input_ids"]
    if keyword is None or start is None or start < 1 or ids.shape[0] != 1:
        return None
    # Other per-token inputs (token types, multimodal rope markers) change how the model masks or
    # positions tokens, which a resumed forward need not reproduce: those families run whole.
    if any(_per_token(k, v, 1, ids.shape[1]) for k, v in prep.inputs.items() if k != "input_ids"):
        return None
    head = {"input_ids": ids[:, :start]}
    if "attention_mask" in prep.inputs:
        head["attention_mask"] = prep.inputs["attention_mask"][:, :start]
    try:
        cache = getattr(prep.model(**head, **{keyword: None}, use_cache=True), "past_key_values", None)
    except SHORTCUT_FAILURES:
        return None
    if cache is None or not hasattr(cache, "batch_repeat_interleave") or cache.get_seq_length() != start:
        return None
    return SharedPrefix(start, cache, keyword, int(ids.shape[1]))


@torch.inference_mode()
def batched_logprobs(model: torch.nn.Module, count: int, make_batch: Callable[[int, int], dict[str, Any]],
                     batch_size: int, logit_positions: torch.Tensor, token_ids: torch.Tensor | None,
                     prefix: SharedPrefix | None = None, rows: LogitRows | None = None) -> torch.Tensor:
    """Score ``count`` perturbed copies, ``batch_size`` per forward; ``make_batch(start, stop)``
    builds the model inputs of copies ``start..stop-1``; ``prefix``: their shared prefix cache;
    ``rows``: cut the last block to the logit rows. Returns (count, T) or (count, T, vocab)."""
    chunks = []
    for start in range(0, count, batch_size):
        stop = min(count, start + batch_size)
        chunks.append(logprobs_at(model, make_batch(start, stop), logit_positions, token_ids, prefix, rows).cpu())
    return torch.cat(chunks) if chunks else torch.empty(0)


def batch_size_for(prep: Prepared, batch_size: int | None, *, eager: bool = False,
                   logit_rows: int | None = None, most: int | None = None) -> int:
    """``batch_size`` checked, or when None as many copies of a forward without a graph as the run's
    memory budget fits (:func:`~xmllm.explainers.memory.copies_within`; at most the device's cap or
    ``most``): ``eager`` when the forwards materialise attention weights, ``logit_rows`` when they
    read more rows over the whole vocabulary than the answer's."""
    if batch_size is not None:
        return positive_int("batch_size", batch_size)
    per_copy = forward_copy_bytes(prep, eager=eager, logit_rows=logit_rows)
    return copies_within(per_copy, prep.loaded.device, most=most)


def eager_unless_fused(prep: Prepared, fast_attention: bool) -> bool:
    """Whether forwards run ``with fused_attention(model, fast_attention)`` materialise attention
    weights: the model's own kernel is eager and the fused one was not asked for."""
    return not fast_attention and uses_eager(prep.model)


def answer_ids(prep: Prepared) -> torch.Tensor:
    """What the scored forwards read at each answer position: the answer's token ids, or with a
    contrast the (answer, foil) pair (:meth:`Prepared.target_ids`)."""
    return prep.target_ids()


def base_logprobs(prep: Prepared) -> torch.Tensor:
    """The unperturbed answer tokens' log-probabilities, (T,)."""
    with torch.inference_mode():
        return logprobs_at(prep.model, dict(prep.inputs), prep.logit_positions, answer_ids(prep))[0].cpu()


# --- image cells -----------------------------------------------------------------------------------


def cell_map(prep: Prepared) -> torch.Tensor:
    """The adapter's pixel -> image-token position map, on the pixels' device."""
    if "pixel_values" not in prep.inputs:
        raise ValueError(f"sample {prep.sample.id!r} has no image: nothing to occlude")
    mapping = prep.adapter.pixel_cell_map(prep.inputs)
    pixels = prep.inputs["pixel_values"]
    if tuple(mapping.shape) != tuple(pixels.shape):
        raise ValueError(f"pixel_cell_map shape {tuple(mapping.shape)} != pixel_values shape {tuple(pixels.shape)}")
    return mapping.to(pixels.device)


def first_layout(prep: Prepared) -> ImageLayout:
    if not prep.layouts or not prep.layouts[0].grids:
        raise ValueError(f"sample {prep.sample.id!r} has no image grid to occlude")
    return prep.layouts[0]


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
            raise ValueError(f"parameter blur_radius={blur_radius!r} must be a number of pixels > 0")
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


# --- prompt words ----------------------------------------------------------------------------------


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
        raise ValueError("parameter replacement=None: the tokenizer has neither an unk nor a pad token; pass one")
    if isinstance(replacement, str):
        ids = tok.convert_tokens_to_ids([replacement])
        if not ids or ids[0] is None or (ids[0] == tok.unk_token_id and replacement != tok.unk_token):
            raise ValueError(f"parameter replacement={replacement!r} is not a single token of the tokenizer")
        return int(ids[0])
    if isinstance(replacement, bool) or not isinstance(replacement, (int, np.integer)) or not (
        0 <= int(replacement) < len(tok)
    ):
        raise ValueError(f"parameter replacement={replacement!r} must be a token string or an id below {len(tok)}")
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


# --- explainers ------------------------------------------------------------------------------------


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


@register
class Occlusion(Explainer):
    id = "perturbation.occlusion"
    title = "Occlusion (batched)"
    family = FAMILY
    supports_contrast = True
    citations = (ZEILER_FERGUS,)
    summary = (
        "Occlude each window of image cells with a baseline and measure the drop in every answer "
        "token's log-probability; many occluded copies per teacher-forced forward."
    )

    @dataclass(frozen=True)
    class Params(MaskingParams):
        window: int = param(1, "side of the occluded square, in grid cells", low=1)
        stride: int | None = param(None, "step between windows, in cells (null: the window's side)", low=1)
        prefix_cache: bool = param(True, "share the unoccluded prefix's key/value cache between copies (checked)")
        logit_rows: bool = param(True, "run the last block's post-attention work on the logit rows only (checked)")

    def compute(self, model: LoadedModel, sample: Prepared, params: Params) -> Explanation:
        window, baseline, views, seed = params.window, params.baseline, params.views, params.seed
        stride = window if params.stride is None else params.stride
        prefix_cache, logit_rows, fast_attention = params.prefix_cache, params.logit_rows, params.fast_attention
        prep = sample
        batch_size = batch_size_for(prep, params.batch_size, eager=eager_unless_fused(prep, fast_attention))
        layout = first_layout(prep)
        grid = layout.main_grid
        radius = blur_radius_for(prep, params.blur_radius)
        cells = PixelCells(cell_map(prep))
        base = baseline_pixels(prep, baseline, seed, radius)
        wins = windows(layout, window, stride, views)
        ids = answer_ids(prep)
        with fused_attention(prep.model, fast_attention):
            original = base_logprobs(prep)
            perturbed, shortcuts = occluded_logprobs(prep, base, cells, [w.positions for w in wins], batch_size,
                                                     original, prefix_cache=prefix_cache, logit_rows=logit_rows)
        drops = original[None, :] - perturbed  # (windows, T)
        total = torch.zeros(len(ids), grid.rows, grid.cols, dtype=torch.float64)
        count = torch.zeros(grid.rows, grid.cols, dtype=torch.float64)
        for w, d in zip(wins, drops.double()):
            total[:, w.rows[0] : w.rows[1], w.cols[0] : w.cols[1]] += d[:, None, None]
            count[w.rows[0] : w.rows[1], w.cols[0] : w.cols[1]] += 1
        per_token = total / count
        answer_drop = drops.sum(dim=1)
        worst = int(torch.argmax(answer_drop))
        exp = Explanation(
            self.id,
            {"window": window, "stride": stride, "baseline": baseline, "batch_size": batch_size, "seed": seed,
             "blur_radius": radius if baseline == "blur" else None, "views": views,
             "fast_attention": fast_attention, "prefix_cache": prefix_cache, "logit_rows": logit_rows},
            prep.target(),
        )
        exp.add("image", per_token, ("answer_token", "row", "col"))
        exp.add("image.answer", per_token.sum(dim=0), ("row", "col"))
        exp.scores.update({
            "logprob_answer": float(original.sum()),
            "prob_answer": float(original.sum().exp()),
            "prob_answer_worst": float((original.sum() - answer_drop[worst]).exp()),
            "max_drop": float(answer_drop[worst]),
            "windows": float(len(wins)),
            "forwards": float(1 + shortcuts["forwards"]),
            "prefix_tokens": float(shortcuts["prefix_tokens"]),
        })
        exp.meta.update({
            "grid": grid.name,
            "sign": SIGN_NOTE,
            "worst_window": {"row": wins[worst].row, "col": wins[worst].col, "cells": wins[worst].cells()},
            "logit_rows_only": shortcuts["logit_rows_only"],
            "answer_logprobs": original.tolist(),
        })
        return exp


@register
class TextAblation(Explainer):
    id = "perturbation.text_ablation"
    title = "Question-word ablation"
    family = FAMILY
    supports_contrast = True
    summary = (
        "Drop or replace each word of the question and measure the drop in every answer token's "
        "log-probability; all ablations batched, positions recomputed."
    )

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        mode: str = param("drop", "drop each question token, or replace it by the replacement token",
                          choices=TEXT_MODES)
        replacement: int | str | None = param(None, "the replacing token, as an id or a token (null: unk, else pad)")
        batch_size: int | None = param(None, "ablated copies per forward (null: as many as the device's budget fits)",
                                       low=1)
        fast_attention: bool = param(True, "run the ablated forwards with the fused attention kernel")

    def compute(self, model: LoadedModel, sample: Prepared, params: Params) -> Explanation:
        mode, fast_attention = params.mode, params.fast_attention
        prep = sample
        batch_size = batch_size_for(prep, params.batch_size, eager=eager_unless_fused(prep, fast_attention))
        repl = replacement_id(prep, params.replacement)
        words = question_positions(prep)
        if not words:
            raise ValueError(f"sample {prep.sample.id!r}: the question has no ablatable tokens")
        ids = answer_ids(prep)
        # a drop shifts every later position, answer included, left by one
        shift = 1 if mode == "drop" else 0
        with fused_attention(prep.model, fast_attention):
            original = base_logprobs(prep)
            ablated = batched_logprobs(prep.model, len(words), text_batches(prep, words, mode, repl), batch_size,
                                       prep.logit_positions - shift, ids)
        drops = original[None, :] - ablated  # (words, T)
        target = prep.target()
        columns = {p: j for j, p in enumerate(target.prompt_positions)}
        grid = torch.full((len(ids), len(target.prompt_positions)), float("nan"), dtype=torch.float64)
        for i, p in enumerate(words):
            grid[:, columns[p]] = drops[i].double()
        tokens = prep.tokens()
        tok = prep.loaded.processor.tokenizer
        exp = Explanation(self.id, {"mode": mode, "replacement": repl if mode == "replace" else None,
                                    "batch_size": batch_size, "fast_attention": fast_attention}, target)
        exp.add("prompt", grid, ("answer_token", "prompt_token"))
        exp.add("prompt.answer", grid.sum(dim=0), ("prompt_token",))
        exp.scores.update({
            "logprob_answer": float(original.sum()),
            "words": float(len(words)),
            "max_drop": float(drops.sum(dim=1).max()) if words else 0.0,
        })
        exp.meta.update({
            "sign": SIGN_NOTE,
            "words": [{"position": p, "prompt_index": columns[p], "token": tokens[p]} for p in words],
            "replacement_token": tok.convert_ids_to_tokens([repl])[0] if mode == "replace" else None,
            "answer_logprobs": original.tolist(),
        })
        return exp
