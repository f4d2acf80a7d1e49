"""Demo samples: a scene, a question about it, the answer and the mask it depends on.

Sample ``i`` of seed ``S`` is a pure function of ``(S, i)``. Training draws from a
separate stream (:data:`TRAIN_STREAM`), so no user seed ever reproduces training data.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from xmllm import atomic, write_atomic
from .pictures import PICTURE_QUESTION_TYPES, Pictures, evidence_pictures
from .questions import ALL_QUESTION_TYPES, QUESTION_TYPES, Question
from .world import Scene

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.prepared import ExplainSample

QUESTION_TYPE_NAMES: tuple[str, ...] = tuple(QUESTION_TYPES)
TRAIN_STREAM = 0x7A11_7EA1
"""First element of every training rng key; user-facing seeds use 2-element keys."""
PICTURE_STREAM = 0x91C7
"""Marks the rng keys of samples over several pictures, so that they never repeat a single-image sample's draws."""
PICTURE_TYPE_NAMES: tuple[str, ...] = tuple(PICTURE_QUESTION_TYPES)


@dataclass
class DemoSample:
    """One question about one scene (or several pictures, or a clip's frames), with everything
    needed to check an explanation."""

    id: str
    scene: Scene | Pictures
    question: Question
    answer: str
    pair: str | None = None
    edit: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def question_type(self) -> str:
        return self.question.question_type

    @property
    def text(self) -> str:
        return self.question.text()

    @property
    def grounding(self) -> list:
        """Indices of the objects the answer depends on; ``(picture, object)`` pairs over several pictures."""
        return self.question.grounding(self.scene)

    @property
    def several(self) -> bool:
        """Whether the sample has several pictures (or frames)."""
        return isinstance(self.scene, Pictures)

    @property
    def evidence_image(self) -> int | None:
        """The picture (1 = the first) that holds every grounded object, where one does; None for a
        single-image sample, or where the evidence is in several pictures or none."""
        if not self.several:
            return None
        holding = evidence_pictures(self.grounding)
        return holding[0] + 1 if len(holding) == 1 else None

    def image(self) -> Image.Image:
        """The (first) picture."""
        return self.images()[0]

    def images(self) -> list[Image.Image]:
        return self.scene.render() if self.several else [self.scene.render()]

    def mask(self) -> np.ndarray:
        """Pixels of the objects the answer depends on: in the evidence picture over several pictures
        (empty where no single picture holds the evidence)."""
        if not self.several:
            return self.scene.mask_of(self.grounding)
        masks = self.masks()
        k = self.evidence_image
        return masks[k - 1] if k else np.zeros_like(masks[0])

    def masks(self) -> np.ndarray:
        """Bool ``(pictures, H, W)``: every picture's mask of the grounded objects."""
        return self.scene.masks_of(self.grounding) if self.several else self.scene.mask_of(self.grounding)[None]

    def edited(self, suffix: str, scene: Scene | None = None, question: Question | None = None,
               edit: str | None = None) -> "DemoSample | None":
        """The same sample after a scene or wording edit, with its answer recomputed."""
        scene = scene or self.scene
        question = question or self.question
        answer = question.answer(scene)
        if answer is None:
            return None
        return DemoSample(f"{self.id}-{suffix}", scene, question, answer, edit=edit)


def generate_sample(seed: int, index: int, question_type: str | None = None, *,
                    stream: tuple[int, ...] = ()) -> DemoSample:
    """Sample ``index`` of ``seed``; its question type cycles through the evaluated ones unless given.
    Questions over several pictures draw from their own keys (:data:`PICTURE_STREAM`) and ids (``p...``)."""
    name = question_type or QUESTION_TYPE_NAMES[index % len(QUESTION_TYPE_NAMES)]
    qtype = ALL_QUESTION_TYPES[name]
    several = name in PICTURE_QUESTION_TYPES
    rng = np.random.default_rng([*stream, *((PICTURE_STREAM,) if several else ()), seed, index])
    scene, question = qtype.generate(rng)
    answer = question.answer(scene)
    assert answer is not None, f"question type {qtype.name} generated an ill-posed question"
    prefix = "t" if stream else "p" if several else "s"
    return DemoSample(f"{prefix}{seed}-{index:05d}", scene, question, answer)


def generate_picture_samples(n: int, seed: int) -> list[DemoSample]:
    """``n`` samples of ``seed`` over several pictures and clips, cycling through their question types."""
    return [generate_sample(seed, i, PICTURE_TYPE_NAMES[i % len(PICTURE_TYPE_NAMES)]) for i in range(n)]


def generate_samples(n: int, seed: int, question_types: list[str] | None = None) -> list[DemoSample]:
    """``n`` samples of ``seed``; with ``question_types`` only those question types, cycling."""
    if question_types:
        unknown = [t for t in question_types if t not in ALL_QUESTION_TYPES]
        if unknown:
            raise ValueError(f"unknown question type {unknown[0]!r}; choose from {', '.join(ALL_QUESTION_TYPES)}")
        return [generate_sample(seed, i, question_types[i % len(question_types)]) for i in range(n)]
    return [generate_sample(seed, i) for i in range(n)]


def make_pair(sample: DemoSample, seed: int = 0) -> DemoSample | None:
    """An MMVP-style partner: one detail of the image changed, and with it the answer."""
    rng = np.random.default_rng([seed, 0x9A12, *map(ord, sample.id)])
    for _ in range(10):
        flip = sample.question.kind.flip(rng, sample.question, sample.scene)
        if flip is None:
            continue
        edit, scene = flip
        partner = sample.edited("pair", scene=scene, edit=edit)
        if partner is not None and partner.answer != sample.answer:
            partner.pair, sample.pair = sample.id, partner.id
            return partner
    return None


def counterfactuals(sample: DemoSample, seed: int = 0) -> list[DemoSample]:
    """Edits of the sample: recolour, move or remove the asked-about object, and rephrase.

    Each edit keeps everything else fixed; its answer is recomputed from the edited
    scene, so a model that does not follow the edit shows up as a wrong answer.
    """
    from .world import COLOURS, random_object

    rng = np.random.default_rng([seed, 0xCF, *map(ord, sample.id)])
    out: list[DemoSample] = []
    targets = sample.grounding
    if targets and not sample.several:  # over several pictures: rephrasings (scene edits are make_pair's)
        i = targets[0]
        obj = sample.scene.objects[i]
        new_colour = str(rng.choice([c for c in COLOURS if c != obj.colour]))
        out.append(sample.edited("recolour", scene=sample.scene.with_object(i, colour=new_colour),
                                 edit=f"recolour the {obj.name} {new_colour}"))
        others = sample.scene.without(i)
        moved = random_object(rng, others, colour=obj.colour, shape=obj.shape)
        if moved is not None:
            out.append(sample.edited("move", scene=sample.scene.with_object(i, cx=moved.cx, cy=moved.cy),
                                     edit=f"move the {obj.name}"))
        out.append(sample.edited("remove", scene=others, edit=f"remove the {obj.name}"))
    for t in range(sample.question.n_templates):
        if t != sample.question.template:
            out.append(sample.edited(f"rephrase{t}", question=sample.question.rephrased(t),
                                     edit=f"rephrase: {sample.question.rephrased(t).text()}"))
    return [s for s in out if s is not None]



def sample_record(sample: DemoSample, image_path: str | list[str], mask_path: str | None) -> dict:
    """The JSONL record of the project's sample-set format (over several pictures: a list of
    images, the evidence picture's mask and ``evidence_image``)."""
    rec = {
        "id": sample.id,
        "image": image_path,
        "question": sample.text,
        "answer": sample.answer,
        "question_type": sample.question_type,
    }
    if mask_path is not None:
        rec["mask"] = mask_path
    if sample.evidence_image is not None:
        rec["evidence_image"] = sample.evidence_image
    if sample.pair:
        rec["pair"] = sample.pair
    if sample.edit:
        rec["edit"] = sample.edit
    rec["objects"] = sample.scene.to_json()
    rec["grounding"] = sample.grounding
    return rec


def write_sample_set(samples: list[DemoSample], out_dir: Path, progress: bool = True) -> Path:
    """Write PNGs and ``samples.jsonl`` into ``out_dir``; the JSONL appears atomically last."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    lines = []
    for s in tqdm(samples, desc="writing samples", unit="sample", disable=not progress):
        images = s.images()
        names = [f"images/{s.id}.png"] if len(images) == 1 else [f"images/{s.id}-{k + 1}.png" for k in range(len(images))]
        for image, name in zip(images, names):
            _save_png(image, out_dir / name)
        mask_rel = f"masks/{s.id}.png" if not s.several or s.evidence_image else None
        if mask_rel:
            _save_png(Image.fromarray(s.mask().astype(np.uint8) * 255), out_dir / mask_rel)
        lines.append(json.dumps(sample_record(s, names[0] if len(names) == 1 else names, mask_rel)))
    target = out_dir / "samples.jsonl"
    write_atomic(target, "\n".join(lines) + "\n")
    return target


def _save_png(img: Image.Image, path: Path) -> None:
    atomic(path, lambda fh: img.save(fh, format="PNG"), binary=True)


def to_explain_sample(sample: DemoSample) -> "ExplainSample":
    """The demo sample as explainers take it, ground truth in ``extra`` with the same keys
    as a sample-set record (``question_type``, ``objects``, ``grounding``, ``pair``, ``edit``)."""
    from xmllm.explainers.prepared import ExplainSample

    extra = {"question_type": sample.question_type, "objects": sample.scene.to_json(),
             "grounding": [list(g) for g in sample.grounding] if sample.several else sample.grounding}
    if sample.pair:
        extra["pair"] = sample.pair
    if sample.edit:
        extra["edit"] = sample.edit
    mask = sample.mask()
    if sample.several:
        if sample.evidence_image:  # the mask is that picture's, and the cell metrics score its grid
            extra["evidence_image"] = sample.evidence_image
        else:
            mask = None
    return ExplainSample(sample.images(), sample.text, id=sample.id, expected=sample.answer,
                         mask=mask, extra=extra)
