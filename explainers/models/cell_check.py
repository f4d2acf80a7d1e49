"""A check of an adapter's map that does not trust the adapter: ask the model itself.

With every vision block's attention switched off (its output replaced by zeros, so each vision
token sees only its own patch), a change to the pixels of one grid cell can reach the decoder's
input embeddings only through the tokens fed by that cell's patches. So changing the pixels the
adapter assigns to a cell must change the embeddings at exactly the position the adapter gives
that cell, and nowhere else. A transposed grid, an off-by-one offset, a wrong merge order or a
class token counted as a patch all fail it. Projectors that mix tokens across cells (a resampler)
make the check meaningless; such families have no pixel-cell map to check.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .adapters.base import ModelAdapter
from .errors import AdapterError


class _Stop(Exception):
    """Raised by the first decoder block's pre-hook: nothing after it is needed."""


@dataclass(frozen=True)
class CellMismatch:
    """A cell whose pixels changed the embeddings at positions other than its own."""

    grid: str
    cell: int
    position: int
    changed: tuple[int, ...]

    def __str__(self) -> str:
        return f"grid {self.grid!r} cell {self.cell} (position {self.position}) changed positions {list(self.changed)}"


def _zero_output(module: torch.nn.Module, args: Any, output: Any) -> Any:
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


@contextmanager
def vision_attention_off(adapter: ModelAdapter) -> Iterator[None]:
    """Every vision block's attention outputs zeros while inside; a family without vision blocks
    (Fuyu: each patch projected straight into the decoder) has nothing that mixes patches to switch off."""
    points = adapter.hook_points()
    handles = [
        module.register_forward_hook(_zero_output)
        for name, module in points.items()
        if name.startswith("vision.blocks.") and name.endswith(".attn")
    ]
    if not handles and len(adapter.vision_layers()):
        raise AdapterError(f"{adapter.model_type}: no vision attention to switch off")
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def decoder_inputs(adapter: ModelAdapter, inputs: Mapping[str, Any]) -> torch.Tensor:
    """The hidden states entering the first decoder block (image features written in), over the
    adapter's positions (a cross-attending family's image tokens after the text)."""
    captured: dict[str, torch.Tensor] = {}

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        captured["hidden"] = adapter.decoder_input_sequence(hidden, kwargs).detach().clone()
        raise _Stop

    handle = adapter.decoder_layers()[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            adapter.model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise AdapterError(f"{adapter.model_type}: the first decoder block never ran")
    return captured["hidden"]


def check_cell_positions(
    adapter: ModelAdapter, inputs: Mapping[str, Any], cells_per_grid: int = 3, row: int = 0
) -> list[CellMismatch]:
    """Cells (first, middle, last of every grid of row ``row``) whose pixels change any decoder
    input other than the cell's own position; empty when the adapter's map is right.

    Raises :class:`AdapterError` where a cell has no pixels at all (nothing could be checked).
    """
    layouts = adapter.image_layouts(inputs, row)
    cell_map = adapter.pixel_cell_map(inputs)
    pixels = inputs["pixel_values"]
    mismatches: list[CellMismatch] = []
    with vision_attention_off(adapter):
        base = decoder_inputs(adapter, inputs)[row]
        for layout in layouts:
            for grid in layout.grids:
                picks = sorted({0, grid.size // 2, grid.size - 1})[:cells_per_grid]
                for cell in picks:
                    position = int(grid.positions[cell])
                    where = cell_map == position
                    if not bool(where.any()):
                        raise AdapterError(f"{adapter.model_type}: grid {grid.name!r} cell {cell} covers no pixel")
                    changed_inputs = dict(inputs)
                    bumped = pixels.clone()
                    bumped[where] = bumped[where] + 1.0
                    changed_inputs["pixel_values"] = bumped
                    new = decoder_inputs(adapter, changed_inputs)[row]
                    scale = base.abs().amax().clamp_min(1e-6)
                    # one row per position, whatever else a decoder's inputs carry (hyper-connection streams)
                    change = (new - base).abs().reshape(new.shape[0], -1).amax(dim=-1)
                    moved = (change > 1e-5 * scale).nonzero().flatten().tolist()
                    if moved != [position]:
                        mismatches.append(CellMismatch(grid.name, cell, position, tuple(moved)))
    return mismatches
