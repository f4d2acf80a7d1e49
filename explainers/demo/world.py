"""A world of coloured shapes where the truth is known: scenes, rendering and masks.

Every scene is a short tuple of objects; everything else (pixels, masks, answers) is
derived from it, so an edit to the scene (recolour, move, remove) yields a consistent new
image, new masks and a new answer. Rendering is supersampled for smooth edges and is a
pure function of the scene.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
"""Side of every demo image in pixels (the demo model's vision tower sees it whole)."""
SUPERSAMPLE = 4
BACKGROUND = (28, 30, 36)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (222, 45, 45),
    "green": (46, 175, 70),
    "blue": (52, 96, 235),
    "yellow": (238, 205, 40),
    "purple": (160, 70, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
MIN_SIZE, MAX_SIZE = 22, 32
"""Object side length range in pixels."""
MAX_OBJECTS = 4


@dataclass(frozen=True)
class Obj:
    """One object: its kind and where it sits (centre and side length in pixels)."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class Scene:
    """An image's ground truth: the objects on a plain background."""

    objects: tuple[Obj, ...]
    size: int = IMAGE_SIZE

    def render(self) -> Image.Image:
        """The RGB image of the scene."""
        big = self.size * SUPERSAMPLE
        img = Image.new("RGB", (big, big), BACKGROUND)
        draw = ImageDraw.Draw(img)
        for obj in self.objects:
            _draw(draw, obj, COLOURS[obj.colour], SUPERSAMPLE)
        return img.reduce(SUPERSAMPLE)

    def object_masks(self) -> np.ndarray:
        """Boolean masks, one per object, shape (n_objects, size, size)."""
        big = self.size * SUPERSAMPLE
        masks = np.zeros((len(self.objects), self.size, self.size), dtype=bool)
        for k, obj in enumerate(self.objects):
            canvas = Image.new("L", (big, big), 0)
            _draw(ImageDraw.Draw(canvas), obj, 255, SUPERSAMPLE)
            small = np.asarray(canvas.reduce(SUPERSAMPLE))
            masks[k] = small >= 128
        return masks

    def mask_of(self, indices: list[int]) -> np.ndarray:
        """Union of the masks of the given objects (empty mask for no objects)."""
        if not indices:
            return np.zeros((self.size, self.size), dtype=bool)
        return self.object_masks()[indices].any(axis=0)

    def find(self, colour: str | None = None, shape: str | None = None) -> list[int]:
        """Indices of the objects matching the given attributes."""
        return [
            i
            for i, o in enumerate(self.objects)
            if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)
        ]

    def with_object(self, index: int, **changes: object) -> "Scene":
        """A copy with one object's fields changed (recolour, reshape, move)."""
        objs = list(self.objects)
        objs[index] = replace(objs[index], **changes)
        return Scene(tuple(objs), self.size)

    def without(self, index: int) -> "Scene":
        return Scene(tuple(o for i, o in enumerate(self.objects) if i != index), self.size)

    def plus(self, obj: Obj) -> "Scene":
        return Scene((*self.objects, obj), self.size)

    def fits(self, obj: Obj, ignore: int | None = None, margin: float = 4.0) -> bool:
        """Whether ``obj`` lies inside the image and clear of every other object."""
        x0, y0, x1, y1 = obj.box()
        if x0 < 2 or y0 < 2 or x1 > self.size - 2 or y1 > self.size - 2:
            return False
        for i, o in enumerate(self.objects):
            if i == ignore:
                continue
            a0, b0, a1, b1 = o.box()
            if x0 < a1 + margin and a0 < x1 + margin and y0 < b1 + margin and b0 < y1 + margin:
                return False
        return True

    def to_json(self) -> list[dict]:
        return [
            {"shape": o.shape, "colour": o.colour, "cx": round(o.cx, 3), "cy": round(o.cy, 3), "size": round(o.size, 3)}
            for o in self.objects
        ]

    @classmethod
    def from_json(cls, data: list[dict], size: int = IMAGE_SIZE) -> "Scene":
        return cls(tuple(Obj(**d) for d in data), size)


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, fill: object, scale: int) -> None:
    x0, y0, x1, y1 = (v * scale for v in obj.box())
    cx, cy, h = obj.cx * scale, obj.cy * scale, obj.size * scale / 2
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        inset = h * 0.12  # a square's area matches the circle's better when a bit smaller
        draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(f"unknown shape {obj.shape!r}")


def random_object(rng: np.random.Generator, scene: Scene, colour: str | None = None,
                  shape: str | None = None, tries: int = 200) -> Obj | None:
    """A random object that fits into ``scene``; ``None`` if no place was found."""
    for _ in range(tries):
        size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
        h = size / 2 + 2
        obj = Obj(
            shape=shape or str(rng.choice(SHAPES)),
            colour=colour or str(rng.choice(list(COLOURS))),
            cx=float(rng.uniform(h, scene.size - h)),
            cy=float(rng.uniform(h, scene.size - h)),
            size=size,
        )
        if scene.fits(obj):
            return obj
    return None


def random_scene(rng: np.random.Generator, n_objects: int | None = None, distinct: bool = True) -> Scene:
    """A scene of 1..MAX_OBJECTS objects; with ``distinct`` no two share colour and shape."""
    n = int(n_objects if n_objects is not None else rng.integers(1, MAX_OBJECTS + 1))
    scene = Scene(())
    while len(scene.objects) < n:
        obj = random_object(rng, scene)
        if obj is None:  # crowded: start over, still deterministic under rng
            scene = Scene(())
            continue
        if distinct and scene.find(obj.colour, obj.shape):
            continue
        scene = scene.plus(obj)
    return scene


def relation(a: Obj, b: Obj, dominance: float = 1.5, min_offset: float = 16.0) -> str | None:
    """Where ``a`` lies relative to ``b``: left/right/above/below, or None when unclear.

    Unclear means diagonal (neither axis dominates) or too close to call, so every
    position question in the world has exactly one right answer.
    """
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= dominance * abs(dy) and abs(dx) >= min_offset:
        return "left" if dx < 0 else "right"
    if abs(dy) >= dominance * abs(dx) and abs(dy) >= min_offset:
        return "above" if dy < 0 else "below"
    return None

