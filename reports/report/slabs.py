"""Maps made ready for interactive views: named leading axes with labels, compact values.

A :class:`Slab` is one array (or a stack of sibling arrays) whose *drawn* axes are last (the
image grid, the prompt tokens, a layer x head matrix) and whose *leading* axes are chosen with
controls (answer token, layer, head, ...). Slabs keep reports small: values are float32 with
the mantissa rounded to :data:`MANTISSA_BITS` bits (about four significant digits, which
Bokeh's gzip then compresses well), and arrays over :data:`VALUE_BUDGET` values are cut down
axis by axis, with a note that says what was kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from xmllm.explainers.explanation import Explanation
from xmllm.explainers.text import show_token

MANTISSA_BITS = 12
"""Mantissa bits kept of float32's 23: relative error below 2**-13, about four significant digits."""
VALUE_BUDGET = 1_500_000
"""Most values one view carries into the page (a few MB of gzip+base64 at worst)."""
WHOLE_ANSWER = "whole answer"
"""Label of the extra answer-token entry that shows a map's ``.answer`` sibling."""
HEAD_MEAN = "mean"
"""Label of the extra head entry: the mean over all heads, computed before any head is dropped."""
REDUCE_ORDER = ("head", "layer", "answer_token")
"""Leading axes cut first when a map is over budget; any other leading axis is cut after these."""
SLIDER_AXES = frozenset({"layer"})
"""Axes chosen with a slider (ordered, often many); every other axis gets a drop-down."""
SLIDER_MIN = 13
"""Any axis with at least this many entries gets a slider rather than a drop-down."""


@dataclass
class Axis:
    """One leading axis: its name, what each index is called, and the index shown first."""

    name: str
    labels: list[str]
    default: int = 0
    extra: int = 0
    """Trailing (``whole answer``) or leading (``mean`` head) entries that are not real indices."""

    @property
    def size(self) -> int:
        return len(self.labels)

    @property
    def slider(self) -> bool:
        return self.name in SLIDER_AXES or self.size >= SLIDER_MIN

    @property
    def title(self) -> str:
        return self.name.replace("_", " ")


@dataclass
class Slab:
    """Values of shape ``[*lead sizes, *drawn shape]`` with labelled leading axes."""

    name: str
    values: np.ndarray
    lead: list[Axis]
    drawn: tuple[str, ...]
    drawn_labels: list[list[str]]
    notes: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    """The explanation's map names this slab shows (siblings and stacked maps included)."""

    @property
    def cells(self) -> int:
        return int(np.prod(self.values.shape[len(self.lead):], dtype=np.int64))

    def default_index(self) -> tuple[int, ...]:
        return tuple(a.default for a in self.lead)

    def slice(self, index: Sequence[int]) -> np.ndarray:
        return self.values[tuple(index)]

    def axis(self, name: str) -> int | None:
        return next((i for i, a in enumerate(self.lead) if a.name == name), None)

    def flat(self) -> np.ndarray:
        """The values in C order, rounded for the page."""
        return compact(self.values).ravel()


def compact(values: np.ndarray) -> np.ndarray:
    """float32 with the mantissa rounded to :data:`MANTISSA_BITS` bits (NaN and inf kept)."""
    out = np.ascontiguousarray(values, dtype=np.float32).copy()
    bits = out.view(np.uint32)
    drop = 23 - MANTISSA_BITS
    finite = np.isfinite(out)
    rounded = (bits + np.uint32(1 << (drop - 1))) & np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
    bits[finite] = rounded[finite]
    return out


def axis_labels(exp: Explanation, axis: str, size: int, name: str | None = None) -> list[str]:
    """What each index of ``axis`` is called: answer and prompt tokens from the target, else the
    first list of the right length among ``meta['axis_labels']['<map name>:<axis>']`` (one map's own,
    e.g. a cross-attention map's blocks), ``meta['axis_labels'][axis]``, ``meta['layers']`` (layer
    numbers), ``meta['<axis>_labels']`` and the plural (``meta['modalities']``); else the indices."""
    target = exp.target
    if axis == "answer_token" and len(target.tokens) == size:
        return [f"{i}: {show_token(t)}" for i, t in enumerate(target.tokens)]
    if axis == "prompt_token" and len(target.prompt_tokens) == size:
        return [show_token(t) for t in target.prompt_tokens]
    table = exp.meta.get("axis_labels")
    candidates = [table.get(f"{name}:{axis}"), table.get(axis)] if isinstance(table, dict) else []
    plural = axis[:-1] + "ies" if axis.endswith("y") else axis + "s"
    keys = ("layers",) if axis == "layer" else ()
    candidates += [exp.meta.get(key) for key in (*keys, f"{axis}_labels", plural)]
    for value in candidates:
        if isinstance(value, list) and len(value) == size and all(isinstance(v, (str, int, float)) for v in value):
            return [f"{v:.4g}" if isinstance(v, float) else str(v) for v in value]
    return [str(i) for i in range(size)]


def as_float(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def build_slab(exp: Explanation, name: str, drawn: int, sibling: str | None = None) -> Slab:
    """``exp.maps[name]`` with its last ``drawn`` axes drawn and the others leading; a
    ``.answer`` ``sibling`` (same axes without ``answer_token``) joins as a last answer token."""
    values = as_float(exp.maps[name])
    axes = exp.axes[name]
    lead_names, drawn_names = axes[: len(axes) - drawn], axes[len(axes) - drawn:]
    lead = [Axis(a, axis_labels(exp, a, values.shape[i], name)) for i, a in enumerate(lead_names)]
    members = [name]
    notes: list[str] = []
    t = lead_names.index("answer_token") if "answer_token" in lead_names else None
    if sibling is not None and t is not None:
        whole = np.expand_dims(as_float(exp.maps[sibling]), t)
        values = np.concatenate([values, whole], axis=t)
        lead[t].labels.append(WHOLE_ANSWER)
        lead[t].default = lead[t].size - 1
        lead[t].extra = 1
        members.append(sibling)
        notes.append(f"'{WHOLE_ANSWER}' shows {sibling}.")
    h = lead_names.index("head") if "head" in lead_names else None
    if h is not None and values.shape[h] > 1:
        with np.errstate(all="ignore"):
            mean = np.nanmean(values, axis=h, keepdims=True) if np.isnan(values).any() else values.mean(axis=h, keepdims=True)
        values = np.concatenate([mean, values], axis=h)
        lead[h].labels.insert(0, HEAD_MEAN)
        lead[h].extra = 1
    layer = lead_names.index("layer") if "layer" in lead_names else None
    if layer is not None:
        lead[layer].default = lead[layer].size - 1
    drawn_labels = [axis_labels(exp, a, values.shape[len(lead) + i], name) for i, a in enumerate(drawn_names)]
    slab = Slab(name, values, lead, tuple(drawn_names), drawn_labels, notes, members)
    return fit_budget(slab)


def stack_slabs(exp: Explanation, names: list[str], drawn: int) -> Slab:
    """Maps of identical axes and shape as one slab with a leading ``map`` axis to choose from."""
    first = build_slab(exp, names[0], drawn)
    if len(names) == 1:
        return first
    parts = [first] + [build_slab(exp, n, drawn) for n in names[1:]]
    values = np.stack([p.values for p in parts])
    lead = [Axis("map", list(names))] + first.lead
    slab = Slab(names[0], values, lead, first.drawn, first.drawn_labels, first.notes, list(names))
    return fit_budget(slab)


def fit_budget(slab: Slab, budget: int = VALUE_BUDGET) -> Slab:
    """Cut leading axes (heads by mass, then layers evenly, then answer tokens, then the rest)
    until the slab holds at most ``budget`` values; each cut adds a note saying what was kept."""
    order = [a.name for a in slab.lead if a.name in REDUCE_ORDER]
    order.sort(key=REDUCE_ORDER.index)
    order += [a.name for a in slab.lead if a.name not in REDUCE_ORDER]
    for name in order:
        if slab.values.size <= budget:
            break
        i = slab.axis(name)
        assert i is not None
        axis = slab.lead[i]
        real = axis.size - axis.extra
        keep = max(1, int(real * budget // slab.values.size))
        if keep >= real:
            continue
        slab = _keep(slab, i, _choose(slab, i, keep))
    return slab


def _choose(slab: Slab, i: int, keep: int) -> list[int]:
    """Indices (into the stored axis) to keep of axis ``i``; extra entries always stay."""
    axis = slab.lead[i]
    real = axis.size - axis.extra
    if axis.name == "head":  # the mean first, then the heads with most mass
        moved = np.moveaxis(slab.values, i, 0)[axis.extra:]
        with np.errstate(all="ignore"):
            mass = np.nan_to_num(np.abs(moved).reshape(real, -1)).mean(axis=1)
        best = sorted(np.argsort(-mass, kind="stable")[:keep].tolist())
        return list(range(axis.extra)) + [axis.extra + b for b in best]
    if axis.name == "layer":  # evenly spaced, the last layer included
        picks = sorted({int(round(x)) for x in np.linspace(real - 1, 0, keep)})
        return picks
    first = list(range(keep))
    return first + list(range(real, axis.size)) if axis.name == "answer_token" else first


def _keep(slab: Slab, i: int, picks: list[int]) -> Slab:
    axis = slab.lead[i]
    real = axis.size - axis.extra
    values = np.take(slab.values, picks, axis=i)
    labels = [axis.labels[p] for p in picks]
    default = picks.index(axis.default) if axis.default in picks else len(picks) - 1
    lead = list(slab.lead)
    lead[i] = Axis(axis.name, labels, default, axis.extra)
    kept = len(picks) - axis.extra
    note = f"{axis.title}: {kept} of {real} kept to keep the page small"
    if axis.name == "head":
        note += f" (those with most mass; '{HEAD_MEAN}' is over all {real})"
    elif axis.name == "layer":
        note += " (evenly spaced)"
    return replace(slab, values=values, lead=lead, notes=[*slab.notes, note + "."])


def finite_range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return 0.0, 1.0
    return float(finite.min()), float(finite.max())


def is_signed(values: np.ndarray) -> bool:
    """Whether a slice has values on both sides of zero (and so gets a diverging scale)."""
    lo, hi = finite_range(values)
    return lo < 0 < hi


def colour_range(values: np.ndarray, signed: bool) -> tuple[float, float]:
    """Colour-scale limits of one slice: symmetric around zero for signed maps (what the
    page's script computes the same way)."""
    lo, hi = finite_range(values)
    if signed:
        m = max(abs(lo), abs(hi)) or 1.0
        return -m, m
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def describe(values: np.ndarray) -> dict[str, Any]:
    """Shape and summary statistics, for arrays no view draws."""
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    stats: dict[str, Any] = {"shape": list(arr.shape)}
    if finite.size:
        stats.update(min=float(finite.min()), max=float(finite.max()), mean=float(finite.mean()))
    if arr.size - finite.size:
        stats["non_finite"] = int(arr.size - finite.size)
    return stats
