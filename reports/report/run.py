"""A saved run folder read back: manifest, explanations and input images, nothing else.

Reports render from this alone, so a cached run re-renders without loading the model. Every
failure is a one-line :class:`XmllmError` that names the file at fault.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from PIL import Image

from xmllm.explainers.explanation import Explanation, Target

from ..explainers.errors import XmllmError

MANIFEST = "manifest.json"
ARRAYS = "explanations.npz"


@dataclass
class SavedRun:
    """What ``xmllm explain --out DIR`` left in DIR."""

    folder: Path
    manifest: dict[str, Any]
    explanations: list[Explanation]
    images: list[Image.Image] = field(default_factory=list)
    image_names: list[str] = field(default_factory=list)

    @property
    def target(self) -> Target | None:
        """The answer being explained, from the first explanation that carries one."""
        for exp in self.explanations:
            if exp.target.tokens:
                return exp.target
        return self.explanations[0].target if self.explanations else None


def load_run(folder: Path) -> SavedRun:
    """Read ``folder``'s manifest, arrays and images; a one-line error naming the bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise XmllmError(f"{folder}: not a run folder (expected a folder written by 'xmllm explain --out')")
    manifest_path, arrays_path = folder / MANIFEST, folder / ARRAYS
    for path in (manifest_path, arrays_path):
        if not path.is_file():
            raise XmllmError(f"{path}: missing; a run folder holds {MANIFEST} and {ARRAYS} ('xmllm explain --out')")
    manifest = _read_manifest(manifest_path)
    explanations = _read_explanations(manifest, manifest_path, arrays_path)
    names = _image_names(manifest, manifest_path)
    images = [_read_image(folder / name) for name in names]
    return SavedRun(folder, manifest, explanations, images, names)


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise XmllmError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise XmllmError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("explanations"), list):
        raise XmllmError(f"{path}: field 'explanations' is missing or not a list")
    return manifest


def _read_explanations(manifest: dict[str, Any], manifest_path: Path, arrays_path: Path) -> list[Explanation]:
    import numpy as np

    out = []
    try:
        with np.load(arrays_path, allow_pickle=False) as data:
            for i, head in enumerate(manifest["explanations"]):
                where = f"{manifest_path}: explanations[{i}]"
                try:
                    eid = head["explainer"]
                    exp = Explanation(eid, dict(head.get("params") or {}), Target(**head["target"]),
                                      scores=dict(head.get("scores") or {}), meta=dict(head.get("meta") or {}))
                    axes = head["axes"]
                except (KeyError, TypeError) as exc:
                    raise XmllmError(f"{where}: malformed header ({type(exc).__name__}: {exc})") from None
                for name, names in axes.items():
                    key = f"{eid}/{name}"
                    if key not in data.files:
                        raise XmllmError(f"{arrays_path}: array {key!r} named in {manifest_path.name} is missing")
                    array = data[key]
                    if array.ndim != len(names):
                        raise XmllmError(f"{arrays_path}: array {key!r} has {array.ndim} dims but axes {names}")
                    exp.maps[name] = array
                    exp.axes[name] = tuple(names)
                out.append(exp)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise XmllmError(f"{arrays_path}: not a readable .npz archive ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return out


def _image_names(manifest: dict[str, Any], manifest_path: Path) -> list[str]:
    names = (manifest.get("sample") or {}).get("images") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise XmllmError(f"{manifest_path}: field sample.images must be a list of file names")
    for name in names:
        pure = PurePath(name)
        if pure.is_absolute() or len(pure.parts) != 1 or name in (".", ".."):
            raise XmllmError(f"{manifest_path}: sample.images entry {name!r} must be a file name inside the run folder")
    return names


def _read_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise XmllmError(f"{path}: missing (listed in {MANIFEST} under sample.images)")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, Image.DecompressionBombError) as exc:
        raise XmllmError(f"{path}: not a readable image ({exc})") from None
