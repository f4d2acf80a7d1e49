"""Questions over several pictures or the frames of a short clip, where one picture or frame
holds the evidence: "In which picture is the red circle?", "How many stars in both pictures?",
"Which way does the circle move?", "In which frame does the square appear?".

A sample's ground truth is a :class:`Pictures` (one :class:`~.world.Scene` per picture or frame);
its grounding is a list of ``(picture, object)`` pairs, so every picture's mask and the picture
that holds the evidence follow from it, as single-image masks follow from a scene.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .questions import ALL_QUESTION_TYPES, NUMBER_WORDS, Question, QuestionType, _other
from .world import COLOURS, IMAGE_SIZE, MAX_OBJECTS, SHAPES, Obj, Scene, random_object, random_scene

ORDINALS: tuple[str, ...] = ("first", "second", "third", "fourth")
"""Answers to "which picture / which frame", and the markers the demo's chat template writes before
each picture when there are several (as Qwen2-VL's "Picture 1:")."""
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
CLIP_FRAMES = 3
"""Frames of a demo clip: three 64-token frames and the question fit the demo's 256-token context."""
PAIR_PICTURES = 2

Grounding = list[tuple[int, int]]
"""``(picture, object)`` pairs: the objects the answer depends on, in the pictures they are in."""


@dataclass(frozen=True)
class Pictures:
    """Several pictures (or a clip's frames) as ground truth: one scene each."""

    scenes: tuple[Scene, ...]

    def render(self) -> list[Image.Image]:
        return [s.render() for s in self.scenes]

    def masks_of(self, grounding: Grounding) -> np.ndarray:
        """Bool ``(pictures, size, size)``: each picture's mask of the grounded objects in it."""
        return np.stack([s.mask_of([i for p, i in grounding if p == k]) for k, s in enumerate(self.scenes)])

    def with_scene(self, k: int, scene: Scene) -> "Pictures":
        scenes = list(self.scenes)
        scenes[k] = scene
        return Pictures(tuple(scenes))

    def to_json(self) -> list[list[dict]]:
        return [s.to_json() for s in self.scenes]

    @classmethod
    def from_json(cls, data: list[list[dict]], size: int = IMAGE_SIZE) -> "Pictures":
        return cls(tuple(Scene.from_json(list(d), size) for d in data))


def evidence_pictures(grounding: Grounding) -> list[int]:
    """The pictures (0-based, ascending) that hold a grounded object."""
    return sorted({p for p, _ in grounding})


class PictureQuestionType(QuestionType):
    """A question over several pictures: ``generate`` returns a :class:`Pictures`; ``answer``,
    ``grounding`` and ``flip`` take one."""

    pictures: int = PAIR_PICTURES

    def grounding(self, slot: dict[str, str], scene: Pictures) -> Grounding:  # type: ignore[override]
        """Every ``colour shape`` object the slot names, in every picture."""
        return [(k, i) for k, s in enumerate(scene.scenes) for i in s.find(slot["colour"], slot["shape"])]


class WhichOne(PictureQuestionType):
    """"Which picture (or frame) holds the object?": the ordinal of the one picture that does."""

    def answer(self, slot, scene):
        holding = evidence_pictures(self.grounding(slot, scene))
        return ORDINALS[holding[0]] if len(holding) == 1 else None

    def _moving(self, rng: np.random.Generator, q: Question, scene: Pictures) -> tuple[int, int] | None:
        """The picture holding the object and another one drawn to move it to; None when not one holds it."""
        holding = evidence_pictures(self.grounding(q.slot, scene))
        if len(holding) != 1:
            return None
        k = holding[0]
        return k, int(rng.choice([p for p in range(len(scene.scenes)) if p != k]))


def _target_slot(rng: np.random.Generator) -> tuple[str, str]:
    return str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))


def _without_kind(rng: np.random.Generator, scene: Scene, colour: str, shape: str) -> Scene:
    """``scene`` with every ``colour shape`` object recoloured (so it no longer matches)."""
    for i in scene.find(colour, shape):
        scene = scene.with_object(i, colour=_other(rng, list(COLOURS), colour))
    return scene


def _place(rng: np.random.Generator, scene: Scene, colour: str, shape: str) -> Scene | None:
    obj = random_object(rng, scene, colour=colour, shape=shape)
    return None if obj is None or len(scene.objects) >= MAX_OBJECTS else scene.plus(obj)


class WhichPicture(WhichOne):
    """Two pictures; the asked-about object is in exactly one. Half the time the other picture
    holds an object of the same colour or the same shape."""

    name = "which_picture"
    templates = (
        "In which picture is the {colour} {shape}?",
        "Which picture shows the {colour} {shape}?",
        "Which picture has the {colour} {shape}?",
    )

    def generate(self, rng):
        while True:
            colour, shape = _target_slot(rng)
            scenes = [_without_kind(rng, random_scene(rng, int(rng.integers(1, MAX_OBJECTS))), colour, shape)
                      for _ in range(self.pictures)]
            k = int(rng.integers(self.pictures))
            placed = _place(rng, scenes[k], colour, shape)
            if placed is None:
                continue
            scenes[k] = placed
            other = (k + 1) % self.pictures
            if rng.random() < 0.5 and scenes[other].objects:  # a near miss in the other picture
                j = int(rng.integers(len(scenes[other].objects)))
                field = "colour" if rng.random() < 0.5 else "shape"
                near = {"colour": colour, "shape": _other(rng, SHAPES, shape)} if field == "colour" else \
                    {"shape": shape, "colour": _other(rng, list(COLOURS), colour)}
                scenes[other] = scenes[other].with_object(j, **near)
            pictures = Pictures(tuple(scenes))
            question = self._question(rng, colour=colour, shape=shape)
            if question.answer(pictures) is not None:
                return pictures, question

    def flip(self, rng, q, scene):
        moving = self._moving(rng, q, scene)
        if moving is None:
            return None
        k, other = moving
        source = scene.scenes[k]
        for i in sorted(source.find(q.slot["colour"], q.slot["shape"]), reverse=True):
            source = source.without(i)
        placed = _place(rng, scene.scenes[other], q.slot["colour"], q.slot["shape"])
        if placed is None:
            return None
        name = f"{q.slot['colour']} {q.slot['shape']}"
        return (f"move the {name} to the {ORDINALS[other]} picture",
                scene.with_scene(k, source).with_scene(other, placed))


class CountPictures(PictureQuestionType):
    """How many objects of one colour or one shape are there in both pictures together (0-4).
    Often all of them are in one picture, so the picture holding the evidence is known."""

    name = "count_pictures"
    by_kind = {
        "colour": ("How many {colour} objects are there in both pictures?",
                   "How many objects are {colour} in both pictures?",
                   "Count the {colour} objects in both pictures."),
        "shape": ("How many {shape}s are there in both pictures?",
                  "How many {shape}s do the two pictures show?",
                  "Count the {shape}s in both pictures."),
    }
    templates = by_kind["shape"]

    def templates_for(self, slot):
        return self.by_kind["colour" if "colour" in slot else "shape"]

    @staticmethod
    def _fixed(slot: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in slot.items() if k in ("colour", "shape")}

    def generate(self, rng):
        kind = "colour" if rng.random() < 0.5 else "shape"
        value = str(rng.choice(list(COLOURS) if kind == "colour" else SHAPES))
        want = int(rng.integers(0, len(NUMBER_WORDS)))
        if want and rng.random() < 0.3:  # all in one picture
            split = [want, 0] if rng.random() < 0.5 else [0, want]
        else:
            first = int(rng.integers(0, want + 1))
            split = [first, want - first]
        scenes = [self._scene(rng, kind, value, n) for n in split]
        return Pictures(tuple(scenes)), self._question(rng, **{kind: value})

    @staticmethod
    def _scene(rng: np.random.Generator, kind: str, value: str, matching: int) -> Scene:
        total = int(rng.integers(max(matching, 1), MAX_OBJECTS + 1))
        scene = Scene(())
        while len(scene.objects) < total:
            match = len(scene.objects) < matching
            obj = random_object(rng, scene, **({kind: value} if match else {}))
            if obj is None:
                scene = Scene(())
                continue
            if not match and getattr(obj, kind) == value:
                continue
            scene = scene.plus(obj)
        return scene

    def grounding(self, slot, scene):
        return [(k, i) for k, s in enumerate(scene.scenes) for i in s.find(**self._fixed(slot))]

    def answer(self, slot, scene):
        n = len(self.grounding(slot, scene))
        return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else None

    def flip(self, rng, q, scene):
        found = self.grounding(q.slot, scene)
        if found and (len(found) == len(NUMBER_WORDS) - 1 or rng.random() < 0.5):
            k, i = found[int(rng.integers(len(found)))]
            name = scene.scenes[k].objects[i].name
            return (f"remove the {name} from the {ORDINALS[k]} picture",
                    scene.with_scene(k, scene.scenes[k].without(i)))
        k = int(rng.integers(len(scene.scenes)))
        if len(scene.scenes[k].objects) >= MAX_OBJECTS:
            return None
        obj = random_object(rng, scene.scenes[k], **self._fixed(q.slot))
        if obj is None:
            return None
        return f"add a {obj.name} to the {ORDINALS[k]} picture", scene.with_scene(k, scene.scenes[k].plus(obj))


def _background(rng: np.random.Generator, colour: str, shape: str, most: int) -> Scene:
    """A static scene of 0..``most`` objects, none of them ``colour shape``."""
    scene = random_scene(rng, int(rng.integers(1, most + 1)))
    scene = _without_kind(rng, scene, colour, shape)
    return scene if rng.random() < 0.8 else Scene(())


class Motion(PictureQuestionType):
    """A three-frame clip: one object moves in a straight line (left, right, up or down) past
    objects that stand still. The evidence is in every frame (where the object is in each)."""

    name = "motion"
    pictures = CLIP_FRAMES
    templates = (
        "Which way does the {colour} {shape} move?",
        "In which direction does the {colour} {shape} move?",
        "Where does the {colour} {shape} go?",
    )
    STEP = (18.0, 26.0)
    """Pixels moved between frames along the direction (two steps: 36-52 pixels in the clip)."""

    def generate(self, rng):
        while True:
            colour, shape = _target_slot(rng)
            direction = str(rng.choice(DIRECTIONS))
            back = _background(rng, colour, shape, 2)
            frames = self._frames(rng, back, colour, shape, direction)
            if frames is not None:
                return frames, self._question(rng, colour=colour, shape=shape)

    def _frames(self, rng: np.random.Generator, back: Scene, colour: str, shape: str, direction: str,
                tries: int = 100) -> Pictures | None:
        ux, uy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
        for _ in range(tries):
            start = random_object(rng, back, colour=colour, shape=shape)
            if start is None:
                return None
            step = float(rng.uniform(*self.STEP))
            drift = float(rng.uniform(-3, 3))
            path = [Obj(shape, colour, start.cx + k * (ux * step + uy * drift),
                        start.cy + k * (uy * step + ux * drift), start.size) for k in range(self.pictures)]
            if all(back.fits(o) for o in path):
                return Pictures(tuple(back.plus(o) for o in path))
        return None

    def answer(self, slot, scene):
        found = self.grounding(slot, scene)
        if [k for k, _ in found] != list(range(len(scene.scenes))):
            return None  # the object must be in every frame, once
        first = scene.scenes[0].objects[found[0][1]]
        last = scene.scenes[-1].objects[found[-1][1]]
        dx, dy = last.cx - first.cx, last.cy - first.cy
        if abs(dx) >= 2 * abs(dy) and abs(dx) >= 30:
            return "left" if dx < 0 else "right"
        if abs(dy) >= 2 * abs(dx) and abs(dy) >= 30:
            return "up" if dy < 0 else "down"
        return None

    def flip(self, rng, q, scene):
        if self.answer(q.slot, scene) is None:
            return None
        return "play the clip backwards", Pictures(tuple(reversed(scene.scenes)))


class WhichFrame(WhichOne):
    """A three-frame clip of a still scene in which one object shows up in one frame only."""

    name = "which_frame"
    pictures = CLIP_FRAMES
    templates = (
        "In which frame does the {colour} {shape} appear?",
        "Which frame shows the {colour} {shape}?",
        "In which frame is the {colour} {shape}?",
    )

    def generate(self, rng):
        while True:
            colour, shape = _target_slot(rng)
            back = _background(rng, colour, shape, 3)
            k = int(rng.integers(self.pictures))
            placed = _place(rng, back, colour, shape)
            if placed is not None:
                frames = tuple(placed if f == k else back for f in range(self.pictures))
                return Pictures(frames), self._question(rng, colour=colour, shape=shape)

    def flip(self, rng, q, scene):
        moving = self._moving(rng, q, scene)
        if moving is None:
            return None
        k, other = moving
        moved = scene.with_scene(other, scene.scenes[k]).with_scene(k, scene.scenes[other])
        return f"show the {q.slot['colour']} {q.slot['shape']} in the {ORDINALS[other]} frame", moved


PICTURE_QUESTION_TYPES: dict[str, PictureQuestionType] = {
    t.name: t for t in (WhichPicture(), CountPictures(), Motion(), WhichFrame())}
"""The evaluated questions over several pictures and clips, by name, in a fixed order."""
PICTURE_ANSWERS: tuple[str, ...] = (*ORDINALS, *DIRECTIONS)


def by_group(hits: dict[str, list[bool]]) -> dict[str, list[bool]]:
    """Per-question-type results pooled into ``single`` (single-image types) and ``pictures``."""
    return {"single": [h for t, v in hits.items() if t not in PICTURE_QUESTION_TYPES for h in v],
            "pictures": [h for t, v in hits.items() if t in PICTURE_QUESTION_TYPES for h in v]}


ALL_QUESTION_TYPES.update(PICTURE_QUESTION_TYPES)  # registered beside the single-image types: Question.kind finds them
