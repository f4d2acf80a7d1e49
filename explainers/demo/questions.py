"""Question types over the shape world: each knows its wording, its answer, the objects
the answer depends on, and the smallest scene edit that changes the answer.

Question types are registered by name; each generates its own scene so that answers are
balanced (a count question is as often "zero" as "four").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .world import COLOURS, MAX_OBJECTS, SHAPES, Obj, Scene, random_object, random_scene, relation

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


@dataclass(frozen=True)
class Question:
    """A question as structure: its question type, wording variant and slot values."""

    question_type: str
    template: int
    slots: tuple[tuple[str, str], ...]

    @property
    def slot(self) -> dict[str, str]:
        return dict(self.slots)

    @property
    def kind(self) -> "QuestionType":
        return ALL_QUESTION_TYPES[self.question_type]

    def text(self) -> str:
        return self.kind.templates_for(self.slot)[self.template].format(**self.slot)

    def answer(self, scene: Scene) -> str | None:
        """The right answer on ``scene``, or None when the question is ill-posed there."""
        return self.kind.answer(self.slot, scene)

    def grounding(self, scene: Scene) -> list[int]:
        """Indices of the objects the answer depends on (empty when none is visible)."""
        return self.kind.grounding(self.slot, scene)

    def rephrased(self, template: int) -> "Question":
        return Question(self.question_type, template, self.slots)

    @property
    def n_templates(self) -> int:
        return len(self.kind.templates_for(self.slot))


class QuestionType:
    """One question type. Subclasses set ``name`` and ``templates`` and implement the rest."""

    name: ClassVar[str]
    templates: ClassVar[tuple[str, ...]]

    def templates_for(self, slot: dict[str, str]) -> tuple[str, ...]:
        return self.templates

    def generate(self, rng: np.random.Generator) -> tuple[Scene, Question]:
        raise NotImplementedError

    def answer(self, slot: dict[str, str], scene: Scene) -> str | None:
        raise NotImplementedError

    def grounding(self, slot: dict[str, str], scene: Scene) -> list[int]:
        raise NotImplementedError

    def flip(self, rng: np.random.Generator, q: Question, scene: Scene) -> tuple[str, Scene] | None:
        """A one-detail edit of ``scene`` that changes the answer: (edit description, scene)."""
        raise NotImplementedError

    def _question(self, rng: np.random.Generator, **slots: str) -> Question:
        n = len(self.templates_for(slots))
        return Question(self.name, int(rng.integers(n)), tuple(sorted(slots.items())))


def _other(rng: np.random.Generator, options: list[str] | tuple[str, ...], current: str) -> str:
    return str(rng.choice([o for o in options if o != current]))


class ColourOfShape(QuestionType):
    name = "colour"
    templates = (
        "What colour is the {shape}?",
        "Which colour does the {shape} have?",
        "Tell me the colour of the {shape}.",
    )

    def generate(self, rng):
        scene = random_scene(rng)
        target = int(rng.integers(len(scene.objects)))
        shape = scene.objects[target].shape
        # make the shape unique by reshaping any other object that shares it
        for i, o in enumerate(scene.objects):
            if i != target and o.shape == shape:
                scene = scene.with_object(i, shape=_other(rng, SHAPES, shape))
        return scene, self._question(rng, shape=shape)

    def answer(self, slot, scene):
        idx = scene.find(shape=slot["shape"])
        return scene.objects[idx[0]].colour if len(idx) == 1 else None

    def grounding(self, slot, scene):
        idx = scene.find(shape=slot["shape"])
        return idx if len(idx) == 1 else []

    def flip(self, rng, q, scene):
        (i,) = self.grounding(q.slot, scene) or (None,)
        if i is None:
            return None
        new = _other(rng, list(COLOURS), scene.objects[i].colour)
        return f"recolour the {scene.objects[i].name} {new}", scene.with_object(i, colour=new)


class ShapeOfColour(QuestionType):
    name = "shape"
    templates = (
        "What shape is the {colour} object?",
        "Which shape is {colour}?",
        "Name the shape of the {colour} object.",
    )

    def generate(self, rng):
        scene = random_scene(rng)
        target = int(rng.integers(len(scene.objects)))
        colour = scene.objects[target].colour
        for i, o in enumerate(scene.objects):
            if i != target and o.colour == colour:
                scene = scene.with_object(i, colour=_other(rng, list(COLOURS), colour))
        return scene, self._question(rng, colour=colour)

    def answer(self, slot, scene):
        idx = scene.find(colour=slot["colour"])
        return scene.objects[idx[0]].shape if len(idx) == 1 else None

    def grounding(self, slot, scene):
        idx = scene.find(colour=slot["colour"])
        return idx if len(idx) == 1 else []

    def flip(self, rng, q, scene):
        (i,) = self.grounding(q.slot, scene) or (None,)
        if i is None:
            return None
        new = _other(rng, SHAPES, scene.objects[i].shape)
        return f"reshape the {scene.objects[i].name} into a {new}", scene.with_object(i, shape=new)


class Count(QuestionType):
    """How many objects, or how many of one colour or one shape."""

    name = "count"
    by_kind = {
        "all": ("How many objects are there?", "How many objects are in the image?", "Count the objects."),
        "colour": ("How many {colour} objects are there?", "How many objects are {colour}?", "Count the {colour} objects."),
        "shape": ("How many {shape}s are there?", "How many {shape}s are in the image?", "Count the {shape}s."),
    }
    templates = by_kind["all"]

    def templates_for(self, slot):
        return self.by_kind[self._kind(slot)]

    @staticmethod
    def _kind(slot: dict[str, str]) -> str:
        return "colour" if "colour" in slot else "shape" if "shape" in slot else "all"

    def _match(self, slot, scene) -> list[int]:
        return scene.find(colour=slot.get("colour"), shape=slot.get("shape"))

    def generate(self, rng):
        kind = str(rng.choice(list(self.by_kind)))
        lo = 1 if kind == "all" else 0
        want = int(rng.integers(lo, MAX_OBJECTS + 1))
        if kind == "all":
            return random_scene(rng, want, distinct=False), self._question(rng)
        value = str(rng.choice(list(COLOURS) if kind == "colour" else SHAPES))
        n_total = int(rng.integers(max(want, 1), MAX_OBJECTS + 1))
        scene = Scene(())
        while len(scene.objects) < n_total:
            matching = len(scene.objects) < want
            fixed = {kind: value} if matching else {}
            obj = random_object(rng, scene, **fixed)
            if obj is None:
                scene = Scene(())
                continue
            if not matching and getattr(obj, kind) == value:
                continue
            scene = scene.plus(obj)
        return scene, self._question(rng, **{kind: value})

    def answer(self, slot, scene):
        n = len(self._match(slot, scene))
        return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else None

    def grounding(self, slot, scene):
        return self._match(slot, scene)

    def flip(self, rng, q, scene):
        idx = self._match(q.slot, scene)
        if idx and (len(idx) == len(NUMBER_WORDS) - 1 or rng.random() < 0.5):
            i = int(rng.choice(idx))
            return f"remove the {scene.objects[i].name}", scene.without(i)
        if len(scene.objects) >= MAX_OBJECTS:
            return None
        obj = random_object(rng, scene, colour=q.slot.get("colour"), shape=q.slot.get("shape"))
        return (f"add a {obj.name}", scene.plus(obj)) if obj else None


class Presence(QuestionType):
    """Is there a <colour> <shape>? Half the negatives share colour or shape with an object."""

    name = "presence"
    templates = (
        "Is there a {colour} {shape}?",
        "Does the image contain a {colour} {shape}?",
        "Can you see a {colour} {shape}?",
    )

    def generate(self, rng):
        scene = random_scene(rng)
        if rng.random() < 0.5:
            o = scene.objects[int(rng.integers(len(scene.objects)))]
            return scene, self._question(rng, colour=o.colour, shape=o.shape)
        present = {(o.colour, o.shape) for o in scene.objects}
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        if rng.random() < 0.5:  # adversarial: both the colour and the shape are in the image
            colours = {o.colour for o in scene.objects}
            shapes = {o.shape for o in scene.objects}
            tricky = [(c, s) for c, s in absent if c in colours and s in shapes]
            absent = tricky or absent
        c, s = absent[int(rng.integers(len(absent)))]
        return scene, self._question(rng, colour=c, shape=s)

    def answer(self, slot, scene):
        return "yes" if scene.find(slot["colour"], slot["shape"]) else "no"

    def grounding(self, slot, scene):
        return scene.find(slot["colour"], slot["shape"])

    def flip(self, rng, q, scene):
        idx = self.grounding(q.slot, scene)
        if idx:
            scene2 = scene
            for i in sorted(idx, reverse=True):
                scene2 = scene2.without(i)
            return f"remove the {q.slot['colour']} {q.slot['shape']}", scene2
        if len(scene.objects) >= MAX_OBJECTS:
            return None
        obj = random_object(rng, scene, colour=q.slot["colour"], shape=q.slot["shape"])
        return (f"add a {obj.name}", scene.plus(obj)) if obj else None


class Position(QuestionType):
    """Where is object a relative to object b? Only clear, axis-dominant layouts are asked."""

    name = "position"
    templates = (
        "Where is the {a} relative to the {b}?",
        "In which direction is the {a} from the {b}?",
        "Where is the {a} compared to the {b}?",
    )
    """Every template names ``a`` before ``b``: which object is the subject is then told by
    order alone, and a small decoder does not have to learn the binding per template."""

    def generate(self, rng):
        while True:
            want = str(rng.choice(RELATIONS))
            scene = random_scene(rng, int(rng.integers(2, MAX_OBJECTS + 1)))
            b = scene.objects[0]
            a = _place(rng, scene, b, want)
            if a is None:
                continue
            scene = scene.with_object(1, cx=a.cx, cy=a.cy)
            a, b = scene.objects[1], scene.objects[0]
            if relation(a, b) == want:
                return scene, self._question(rng, a=a.name, b=b.name)

    def _pair(self, slot, scene) -> tuple[int, int] | None:
        a = [i for i, o in enumerate(scene.objects) if o.name == slot["a"]]
        b = [i for i, o in enumerate(scene.objects) if o.name == slot["b"]]
        return (a[0], b[0]) if len(a) == 1 and len(b) == 1 else None

    def answer(self, slot, scene):
        pair = self._pair(slot, scene)
        return relation(scene.objects[pair[0]], scene.objects[pair[1]]) if pair else None

    def grounding(self, slot, scene):
        pair = self._pair(slot, scene)
        return list(pair) if pair else []

    def flip(self, rng, q, scene):
        pair = self._pair(q.slot, scene)
        if not pair:
            return None
        ia, ib = pair
        current = relation(scene.objects[ia], scene.objects[ib])
        if current is None:
            return None
        trial = scene.without(ia)
        moved = _place(rng, trial, scene.objects[ib], OPPOSITE[current], template=scene.objects[ia])
        if moved is None:
            return None
        return f"move the {q.slot['a']} {OPPOSITE[current]} of the {q.slot['b']}", scene.with_object(
            ia, cx=moved.cx, cy=moved.cy
        )


def _place(rng: np.random.Generator, scene: Scene, anchor: Obj, where: str,
           template: Obj | None = None, tries: int = 200) -> Obj | None:
    """Place an object (like ``template``, or a random new one) ``where`` of ``anchor``."""
    ref = template or scene.objects[1]
    for _ in range(tries):
        along = float(rng.uniform(24, 90))
        across = float(rng.uniform(-0.35, 0.35)) * along
        dx, dy = {"left": (-along, across), "right": (along, across),
                  "above": (across, -along), "below": (across, along)}[where]
        cand = Obj(ref.shape, ref.colour, anchor.cx + dx, anchor.cy + dy, ref.size)
        ignore = None if template is not None else 1
        if scene.fits(cand, ignore=ignore) and relation(cand, anchor) == where:
            return cand
    return None


class Describe(QuestionType):
    """List every object from left to right: a many-token answer that makes the decoder read
    each object off the image tokens. Used as a dense training signal and for multi-token
    explanations; not one of the five evaluated question types."""

    name = "describe"
    templates = ("Describe the image.", "What is in the image?", "List the objects.")

    def generate(self, rng):
        return random_scene(rng), self._question(rng)

    def answer(self, slot, scene):
        ordered = sorted(scene.objects, key=lambda o: o.cx)
        return ", ".join(o.name for o in ordered) if ordered else None

    def grounding(self, slot, scene):
        return list(range(len(scene.objects)))

    def flip(self, rng, q, scene):
        i = int(rng.integers(len(scene.objects)))
        new = _other(rng, list(COLOURS), scene.objects[i].colour)
        return f"recolour the {scene.objects[i].name} {new}", scene.with_object(i, colour=new)


QUESTION_TYPES: dict[str, QuestionType] = {
    t.name: t for t in (ColourOfShape(), ShapeOfColour(), Count(), Presence(), Position())}
"""The evaluated question types, by name, in a fixed order (sample i gets type i mod 5)."""
EXTRA_QUESTION_TYPES: dict[str, QuestionType] = {"describe": Describe()}
"""Question types the model also answers, outside the evaluated five."""
ALL_QUESTION_TYPES: dict[str, QuestionType] = {**QUESTION_TYPES, **EXTRA_QUESTION_TYPES}

ANSWER_VOCABULARY: tuple[str, ...] = (*COLOURS, *SHAPES, *NUMBER_WORDS, "yes", "no", *RELATIONS)
