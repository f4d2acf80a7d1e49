"""The project's sample-set format: a JSONL file, one sample a line, paths relative to it.

Fields: ``id``, ``question`` and ``image`` (required), ``answer``, ``mask``, ``question_type``,
``pair`` (optional), and any extra ground truth (``objects``, ``grounding``, ``edit``). Several
pictures: ``image`` a list of paths, in the order the question refers to them. A video instead:
``video`` a path (and no ``image``), with ``frames`` (how many to take; default as ``xmllm explain
--video``). ``evidence_image`` (1 = the first picture or frame taken) names the picture that holds
the evidence, so that an audit can flag answers carried by another one. A record
that names its question type ``family`` (sets written by xmllm 0.2) is read the same way.
Reading validates every line and refuses paths that leave the set's folder unless
absolute paths are explicitly allowed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import XmllmError


class SampleSetError(XmllmError):
    """A sample set that cannot be read; the message names file, line and field."""


@dataclass(frozen=True)
class SampleRecord:
    """One sample of a sample set, with its paths resolved."""

    id: str
    image: Path
    """The first picture, or the video."""
    question: str
    answer: str | None = None
    mask: Path | None = None
    question_type: str | None = None
    pair: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    images: tuple[Path, ...] = ()
    """Every picture in order (the first is ``image``); empty for a video."""
    video: bool = False
    """``image`` is a video whose frames are the pictures."""
    frames: int | None = None

    def load_image(self):
        """The (first) image as RGB; a one-line error for a missing or unreadable file, or a video."""
        from .images import load_image

        if self.video:
            raise SampleSetError(f"sample {self.id!r} is a video ({self.image}): read it with load_pictures()")
        return load_image(self.image)

    def load_pictures(self) -> list:
        """Every picture as RGB, or the video's frames; one-line errors naming the file."""
        from .images import load_image

        if self.video:
            from .video import DEFAULT_FRAMES, load_video

            return load_video(self.image, self.frames or DEFAULT_FRAMES).frames
        return [load_image(path) for path in (self.images or (self.image,))]

    def load_mask(self):
        """The ground-truth mask as a boolean array, or None."""
        if self.mask is None:
            return None
        import numpy as np

        from .images import load_image

        return np.asarray(load_image(self.mask, mode="L")) >= 128

    def sha256(self) -> str:
        """Hash of the pictures' (or video's) bytes and the question: what makes this sample this sample."""
        h = hashlib.sha256()
        for path in self.images or (self.image,):
            h.update(path.read_bytes())
            h.update(b"\0")
        h.update(self.question.encode("utf-8"))
        return h.hexdigest()


_REQUIRED = ("id", "question")
_OPTIONAL_STR = ("answer", "question_type", "pair", "mask")
_OLD_NAMES = {"family": "question_type"}
"""Fields under the name xmllm 0.2 wrote them with: read as the new name."""


def read_sample_set(path: str | Path, *, allow_absolute: bool = False) -> list[SampleRecord]:
    """Read and validate a JSONL sample set; every error is one line naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise SampleSetError(f"{path}: sample set not found")
    root = path.parent.resolve()
    records: list[SampleRecord] = []
    seen: set[str] = set()
    for lineno, line in enumerate(read_utf8(path).split("\n"), start=1):  # not splitlines: JSON may hold U+2028
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SampleSetError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise SampleSetError(f"{where}: each line must be a JSON object")
        for old, new in _OLD_NAMES.items():
            if old in data:
                value = data.pop(old)
                if data.setdefault(new, value) != value:
                    raise SampleSetError(f"{where}: fields {old!r} (the old name of {new!r}) and {new!r} differ")
        for key in _REQUIRED:
            if not isinstance(data.get(key), str) or not data[key].strip():
                raise SampleSetError(f"{where}: field {key!r} must be a non-empty string")
        for key in _OPTIONAL_STR:
            if key in data and data[key] is not None and not isinstance(data[key], str):
                raise SampleSetError(f"{where}: field {key!r} must be a string")
        pictures = _pictures(data, where)
        if data["id"] in seen:
            raise SampleSetError(f"{where}: duplicate sample id {data['id']!r}")
        seen.add(data["id"])
        extra = {k: v for k, v in data.items() if k not in (*_REQUIRED, *_OPTIONAL_STR, *_PICTURES)}
        if data.get("evidence_image") is not None:
            extra["evidence_image"] = data["evidence_image"]
        key = "video" if "video" in data else "image"
        paths = tuple(_resolve(root, rel, where, key, allow_absolute) for rel in pictures)
        records.append(
            SampleRecord(
                id=data["id"],
                image=paths[0],
                images=() if key == "video" else paths,
                video=key == "video",
                frames=data.get("frames"),
                question=data["question"],
                answer=data.get("answer"),
                mask=_resolve(root, data["mask"], where, "mask", allow_absolute) if data.get("mask") else None,
                question_type=data.get("question_type"),
                pair=data.get("pair"),
                extra=extra,
            )
        )
    if not records:
        raise SampleSetError(f"{path}: sample set is empty")
    return records


_PICTURES = ("image", "video", "frames", "evidence_image")


def _pictures(data: dict[str, Any], where: str) -> list[str]:
    """The record's picture paths (one video, or one or more images), its fields checked."""
    if ("image" in data) == ("video" in data):
        raise SampleSetError(f"{where}: give field 'image' (a path or a list of paths) or 'video', one of them")
    if "video" in data:
        if not isinstance(data["video"], str) or not data["video"].strip():
            raise SampleSetError(f"{where}: field 'video' must be a non-empty string")
        frames = data.get("frames")
        if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
            raise SampleSetError(f"{where}: field 'frames' must be a positive integer")
        pictures = [data["video"]]
    else:
        if "frames" in data:
            raise SampleSetError(f"{where}: field 'frames' applies to a 'video'")
        value = data["image"]
        pictures = value if isinstance(value, list) else [value]
        if not pictures or not all(isinstance(v, str) and v.strip() for v in pictures):
            raise SampleSetError(f"{where}: field 'image' must be a non-empty string or a list of them")
    evidence = data.get("evidence_image")
    if evidence is not None and (isinstance(evidence, bool) or not isinstance(evidence, int) or evidence < 1
                                 or ("image" in data and evidence > len(pictures))):
        raise SampleSetError(f"{where}: field 'evidence_image' must be a picture's number, 1 to "
                             f"{len(pictures) if 'image' in data else 'the frames taken'}")
    return pictures


def read_utf8(path: Path) -> str:
    """The file's UTF-8 text; a file in another encoding (Latin-1, UTF-16) is a one-line error
    naming the file, the line and the byte, not a ``UnicodeDecodeError``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SampleSetError(f"{path}: cannot read the file: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise SampleSetError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                             "save the file as UTF-8") from None
    return text.removeprefix("\ufeff")  # a byte-order mark some editors write


def _resolve(root: Path, rel: str, where: str, key: str, allow_absolute: bool) -> Path:
    """A path inside the sample set's folder (or absolute, when allowed)."""
    candidate = Path(rel)
    if candidate.is_absolute():
        if not allow_absolute:
            raise SampleSetError(f"{where}: field {key!r} is an absolute path ({rel!r}); allow absolute paths explicitly")
        return candidate
    resolved = (root / candidate).resolve()
    if not allow_absolute and not resolved.is_relative_to(root):
        raise SampleSetError(f"{where}: field {key!r} leaves the sample set's folder ({rel!r})")
    return resolved
