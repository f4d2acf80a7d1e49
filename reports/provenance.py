"""Provenance: what a result was computed from, so that it can be redone and trusted."""
from __future__ import annotations

import hashlib
import platform
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    from PIL import Image

PACKAGES = ("xmllm", "torch", "transformers", "tokenizers", "numpy", "captum", "pillow", "bokeh", "jinja2")


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def image_sha256(image: "Image.Image") -> str:
    """Hash of the decoded pixels (mode, size, bytes): the same picture hashes the same
    whatever file format it was stored in."""
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def sample_sha256(images: "Iterable[Image.Image]", question: str) -> str:
    """Hash of a sample: its images' pixels and its question."""
    h = hashlib.sha256()
    for img in images:
        h.update(image_sha256(img).encode())
    h.update(b"\0" + question.encode("utf-8"))
    return h.hexdigest()


def file_sha256(path: "Path") -> str:
    """Hash of a file's bytes (a video: its frames are hashed as the sample's pictures too)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


