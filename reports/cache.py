"""A cache of run folders, so that a second ``xmllm build`` redoes no model work.

An entry is a folder named by the SHA-256 of what its content depends on: the weights' hash,
the sample's hash, the explainer (or the kind of result) and its parameters as canonical JSON,
and xmllm's version. It is built in a temporary folder beside its final place and renamed into
place, so an interrupted build leaves no half-written entry, and two builds racing for one key
both end with a complete entry.

The weights' hash here reads the safetensors files exactly as
:func:`xmllm.explainers.models.loading.weights_sha256` does, without importing torch, so that a build
whose results are all cached never loads the model (nor torch).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from xmllm.explainers.scratch import default_cache_dir  # noqa: F401  (re-exported: xmllm.cache.default_cache_dir)

COMPLETE = ".complete"
"""Written last inside an entry: an entry without it is ignored (and rebuilt)."""
_HASH_CHUNK = 1 << 20
_SAFE_WEIGHTS = "*.safetensors"


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal parameters give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def xmllm_version() -> str:
    from .cli import package_version

    return package_version()


def cache_key(weights: str, sample: str, explainer: str, params: dict[str, Any] | None = None,
              version: str | None = None) -> str:
    """The entry name: SHA-256 over weights hash, sample hash, explainer id, parameters, version."""
    parts = {
        "weights": weights,
        "sample": sample,
        "explainer": explainer,
        "params": params or {},
        "xmllm": version if version is not None else xmllm_version(),
    }
    return hashlib.sha256(canonical_json(parts).encode("utf-8")).hexdigest()


def model_folder(spec: str) -> Path | None:
    """The local folder a model spec names ("demo" or a path), or None for a hub id."""
    if spec == "demo":
        from xmllm.explainers.demo import DEMO_MODEL_DIR

        return Path(DEMO_MODEL_DIR)
    path = Path(spec).expanduser()
    return path.resolve() if path.is_dir() else None


def weights_fingerprint(spec: str) -> str | None:
    """SHA-256 over the spec's safetensors files in name order (None: not a local folder).

    Equal to what the loader records as ``weights_sha256``, but without importing torch.
    """
    folder = model_folder(spec)
    if folder is None:
        return None
    files = sorted(folder.glob(_SAFE_WEIGHTS))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass
class RunCache:
    """Run folders by key under ``root``; ``enabled=False`` builds every entry afresh each time."""

    root: Path = field(default_factory=default_cache_dir)
    enabled: bool = True

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> Path | None:
        """The complete entry for ``key``, or None."""
        if not self.enabled:
            return None
        folder = self.path(key)
        return folder if (folder / COMPLETE).is_file() else None

    def get_or_build(self, key: str, build: Callable[[Path], None]) -> Path:
        """The entry for ``key``, made by ``build(tmp_folder)`` when missing.

        ``build`` writes into an empty temporary folder; that folder becomes the entry only
        when ``build`` returns, so a failure leaves nothing behind.
        """
        found = self.get(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=final.parent))
        try:
            build(tmp)
            (tmp / COMPLETE).write_text(key + "\n", encoding="utf-8")
            if final.exists():  # an incomplete leftover, or a racing build's complete entry
                if self.enabled and (final / COMPLETE).is_file():
                    shutil.rmtree(tmp)
                    return final
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final
