"""Sample sets an audit reads, as one list of :class:`AuditItem`: our JSONL format, an image
folder with a CSV, or a Hugging Face ``datasets`` dataset saved with ``save_to_disk``.

Structure is checked up front (empty questions, duplicate ids, paths leaving the set's folder:
one-line errors naming file, line and field, before any model work); images are read per sample,
so one corrupt or missing image fails that sample only. Readers are registered by the config's
``samples.type``.
"""
from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmllm.samples import (  # the set's path rule: inside its folder unless allowed
    SampleSetError,
    _resolve,
    read_utf8,
)

from .config import HfDatasetSource, ImageFolderSource, JsonlSource, LoadedConfig

MAX_FILE_BYTES = 256 << 20
"""An input file larger than this is refused before reading (images are checked again when decoded)."""


@dataclass(frozen=True)
class AuditItem:
    """One sample as the driver knows it: where its image is, not the image itself."""

    index: int
    id: str
    question: str
    expected: str | None = None
    image: Path | None = None
    image_bytes: bytes | None = None
    """Bytes held by a dataset (no file of their own); ``image`` names them in messages."""
    image_name: str = ""
    mask: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    more_images: tuple[Path, ...] = ()
    """The second and later pictures of a sample with several, in order."""
    video: bool = False
    """``image`` is a video: its frames are the pictures (``frames`` of them, or as many as fit)."""
    frames: int | None = None

    @property
    def key(self) -> str:
        """The sample's folder name: a hash of its id (ids may hold any character)."""
        return hashlib.sha256(self.id.encode("utf-8")).hexdigest()[:24]


def read_items(loaded: LoadedConfig) -> list[AuditItem]:
    """Every sample of the configured set (the first ``limit``), checked as described above."""
    source = loaded.config.samples
    items = READERS[source.type](loaded, source)
    if loaded.config.limit is not None:
        items = items[: loaded.config.limit]
    return items


def _jsonl(loaded: LoadedConfig, source: JsonlSource) -> list[AuditItem]:
    from xmllm.samples import read_sample_set

    records = read_sample_set(loaded.resolve(source.path), allow_absolute=loaded.config.allow_absolute_paths)
    out = []
    for i, rec in enumerate(records):
        extra = dict(rec.extra)
        for name in ("question_type", "pair"):
            if getattr(rec, name):
                extra[name] = getattr(rec, name)
        out.append(AuditItem(i, rec.id, rec.question, rec.answer, rec.image, None, str(rec.image.name), rec.mask,
                             extra, tuple(rec.images[1:]), rec.video, rec.frames))
    return out


def _image_folder(loaded: LoadedConfig, source: ImageFolderSource) -> list[AuditItem]:
    allow = loaded.config.allow_absolute_paths
    folder = loaded.resolve(source.folder)
    table = loaded.resolve(source.csv)
    if not folder.is_dir():
        raise SampleSetError(f"{loaded.path}: field samples.folder: {folder} is not a folder")
    if not table.is_file():
        raise SampleSetError(f"{loaded.path}: field samples.csv: {table} not found")
    out: list[AuditItem] = []
    seen: set[str] = set()
    text = read_utf8(table)  # another encoding: one line naming the CSV's line, not a traceback
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = reader.fieldnames or []
        missing = [c for c in ("question",) if c not in columns]
        if "image" not in columns and "video" not in columns:
            missing.insert(0, "image")
        if missing:
            raise SampleSetError(f"{table}: missing column {missing[0]!r} (columns: image or video, question, answer, "
                                 "id, frames, evidence_image)")
        for row in reader:
            where = f"{table}:{reader.line_num}"
            if not (row.get("question") or "").strip():
                raise SampleSetError(f"{where}: field 'question' must be a non-empty string")
            cells = {k: (row.get(k) or "").strip() for k in ("image", "video", "frames", "evidence_image")}
            if bool(cells["image"]) == bool(cells["video"]):
                raise SampleSetError(f"{where}: give field 'image' (several joined by '{CSV_SEPARATOR}') or 'video', "
                                     "one of them")
            key = "video" if cells["video"] else "image"
            names = [n.strip() for n in cells[key].split(CSV_SEPARATOR)] if key == "image" else [cells["video"]]
            if not all(names):
                raise SampleSetError(f"{where}: field 'image' has an empty name between '{CSV_SEPARATOR}'")
            frames = _positive(cells["frames"], where, "frames") if key == "video" else None
            if cells["frames"] and key == "image":
                raise SampleSetError(f"{where}: field 'frames' applies to a 'video'")
            evidence = _positive(cells["evidence_image"], where, "evidence_image")
            if evidence is not None and key == "image" and evidence > len(names):
                raise SampleSetError(f"{where}: field 'evidence_image' must be a picture's number, 1 to {len(names)}")
            sid = (row.get("id") or "").strip() or cells[key]
            if sid in seen:
                raise SampleSetError(f"{where}: duplicate sample id {sid!r}")
            seen.add(sid)
            paths = [_resolve(folder, name, where, key, allow) for name in names]
            extra = {"evidence_image": evidence} if evidence is not None else {}
            out.append(AuditItem(len(out), sid, row["question"], (row.get("answer") or None), paths[0], None,
                                 paths[0].name, None, extra, tuple(paths[1:]), key == "video", frames))
    except csv.Error as exc:
        raise SampleSetError(f"{table}: not a readable CSV ({exc})") from None
    if not out:
        raise SampleSetError(f"{table}: sample set is empty")
    return out


CSV_SEPARATOR = "|"
"""Joins the file names of a CSV sample's several images in its ``image`` cell."""


def _positive(cell: str, where: str, name: str) -> int | None:
    if not cell:
        return None
    if not cell.isdigit() or int(cell) < 1:
        raise SampleSetError(f"{where}: field {name!r} must be a positive integer, got {cell!r}")
    return int(cell)


def _hf_dataset(loaded: LoadedConfig, source: HfDatasetSource) -> list[AuditItem]:
    try:
        import datasets
    except ImportError:
        raise SampleSetError(f"{loaded.path}: samples.type hf_dataset needs the datasets package: "
                             "pip install datasets") from None
    root = loaded.resolve(source.path)
    if not root.is_dir():
        raise SampleSetError(f"{loaded.path}: field samples.path: {root} is not a folder saved with save_to_disk")
    try:
        data = datasets.load_from_disk(str(root))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise SampleSetError(f"{root}: not a dataset saved with save_to_disk ({' '.join(str(exc).split())})") from None
    if isinstance(data, datasets.DatasetDict):
        splits = list(data)
        split = source.split or (splits[0] if len(splits) == 1 else None)
        if split not in data:
            raise SampleSetError(f"{loaded.path}: field samples.split: choose one of {', '.join(splits)}")
        data = data[split]
    cols = source.columns
    for role, name in (("image", cols.image), ("question", cols.question), ("answer", cols.answer), ("id", cols.id)):
        if name is not None and name not in data.column_names:
            raise SampleSetError(f"{loaded.path}: field samples.columns.{role}: the dataset has no column {name!r} "
                                 f"(columns: {', '.join(data.column_names)})")
    if isinstance(data.features[cols.image], datasets.Image):
        data = data.cast_column(cols.image, datasets.Image(decode=False))  # our own defensive decoder reads the bytes
    out: list[AuditItem] = []
    seen: set[str] = set()
    allow = loaded.config.allow_absolute_paths
    for i, row in enumerate(data):
        where = f"{root}: row {i}"
        question = row[cols.question]
        if not isinstance(question, str) or not question.strip():
            raise SampleSetError(f"{where}: field {cols.question!r} must be a non-empty string")
        sid = str(row[cols.id]) if cols.id else str(i)
        if sid in seen:
            raise SampleSetError(f"{where}: duplicate sample id {sid!r}")
        seen.add(sid)
        answer = row[cols.answer] if cols.answer else None
        cell = row[cols.image]
        image, data_bytes, name = None, None, f"row {i}"
        if isinstance(cell, dict) and cell.get("bytes") is not None:
            data_bytes, name = bytes(cell["bytes"]), str(cell.get("path") or f"row-{i}.png")
        elif isinstance(cell, dict) and cell.get("path"):
            image = _resolve(root, cell["path"], where, cols.image, allow)
        elif isinstance(cell, str) and cell:
            image = _resolve(root, cell, where, cols.image, allow)
        else:
            raise SampleSetError(f"{where}: field {cols.image!r} holds no image (bytes or a path)")
        out.append(AuditItem(i, sid, question, None if answer is None else str(answer), image, data_bytes,
                             image.name if image is not None else name))
    if not out:
        raise SampleSetError(f"{root}: dataset is empty")
    return out


READERS: dict[str, Callable[[LoadedConfig, Any], list[AuditItem]]] = {
    "jsonl": _jsonl,
    "image_folder": _image_folder,
    "hf_dataset": _hf_dataset,
}


def read_bytes(path: Path | None) -> bytes | None:
    """A file's bytes for shipping to a worker; a one-line error for a missing or oversized one."""
    from xmllm.images import ImageError

    if path is None:
        return None
    if not path.is_file():
        raise ImageError(f"{path}: image not found")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ImageError(f"{path}: file too large ({size} bytes; limit {MAX_FILE_BYTES})")
    return path.read_bytes()
