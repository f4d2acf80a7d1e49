"""Where each image's feature tokens sit in the decoder's sequence, and how they tile the image.

Explainers address tokens by sequence position. A :class:`PatchGrid` says which positions form
a ``rows x cols`` grid of image patches (row-major) and which part of the picture it covers; an
:class:`ImageLayout` gathers the grids of one image (LLaVA-NeXT: base + tiles; Idefics3: one per
tile + global) with the image-feature tokens that belong to no grid (LLaVA-NeXT's row
newlines) and the structural tokens a processor wraps around an image (begin/end markers, tile
tags), which carry no pixels and are not question text either.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

Region = tuple[float, float, float, float]
"""(top, left, bottom, right) as fractions of the original image's height and width."""

FULL_IMAGE: Region = (0.0, 0.0, 1.0, 1.0)


def _long(positions: torch.Tensor | list[int]) -> torch.Tensor:
    return torch.as_tensor(positions, dtype=torch.long).detach().cpu().flatten()


@dataclass(frozen=True, eq=False)
class PatchGrid:
    """``rows x cols`` image-feature tokens at ``positions`` (row-major) in the sequence.

    Positions are CPU LongTensors, whatever device the inputs are on.

    ``region`` is the part of the original image the grid covers, or None where the adapter
    cannot tell (e.g. a crop whose box the processor does not report).
    """

    name: str
    rows: int
    cols: int
    positions: torch.Tensor
    region: Region | None = FULL_IMAGE

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", _long(self.positions))
        if self.rows * self.cols != self.positions.numel():
            raise ValueError(
                f"grid {self.name!r}: {self.rows}x{self.cols} cells but {self.positions.numel()} positions"
            )

    @property
    def size(self) -> int:
        return self.rows * self.cols

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Per-position ``values[..., seq]`` laid out as ``[..., rows, cols]`` for this grid."""
        picked = values.index_select(-1, self.positions.to(values.device))
        return picked.reshape(*values.shape[:-1], self.rows, self.cols)


@dataclass(frozen=True, eq=False)
class ImageLayout:
    """The decoder positions of one image: its grids, ungridded feature tokens and markers."""

    image_index: int
    grids: tuple[PatchGrid, ...]
    extra_positions: dict[str, torch.Tensor] = field(default_factory=dict)
    """Image-feature tokens outside every grid, keyed by the reason (e.g. ``"image_newline"``)."""
    marker_positions: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    """Processor tokens framing the image (begin/end of image, tile tags): no pixels, no question."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "grids", tuple(self.grids))
        object.__setattr__(self, "extra_positions", {k: _long(v) for k, v in self.extra_positions.items()})
        object.__setattr__(self, "marker_positions", _long(self.marker_positions))

    @property
    def all_positions(self) -> torch.Tensor:
        """Every image-feature token of this image (grids and extras), in sequence order."""
        parts = [g.positions for g in self.grids] + list(self.extra_positions.values())
        if not parts:
            return torch.empty(0, dtype=torch.long)
        return torch.sort(torch.cat(parts)).values

    @property
    def num_tokens(self) -> int:
        return int(self.all_positions.numel())

    def grid(self, name: str) -> PatchGrid:
        for g in self.grids:
            if g.name == name:
                return g
        raise KeyError(f"image {self.image_index} has no grid {name!r}; it has {[g.name for g in self.grids]}")

    @property
    def main_grid(self) -> PatchGrid:
        """The finest grid that covers the whole image: the one to draw a single heatmap from."""
        whole = [g for g in self.grids if g.region == FULL_IMAGE] or list(self.grids)
        return max(whole, key=lambda g: g.size)


def grid_names(layouts: list[ImageLayout]) -> list[tuple[str, PatchGrid]]:
    """``image`` for the first image's main grid, ``image{k}.{grid}`` for every other grid."""
    named = []
    for layout in layouts:
        main = layout.main_grid
        for grid in layout.grids:
            first = layout.image_index == 0 and grid is main
            named.append(("image" if first else f"image{layout.image_index}.{grid.name}", grid))
    return named
