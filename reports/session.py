"""One model for a whole build, loaded only when a result is not already cached.

:class:`ModelSession` turns (sample, explainer, parameters) into a cached run folder. Cache keys
need the weights' hash, which for a local model is read from its files without loading it; so a
build whose every result is cached imports neither torch nor transformers for model work.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .cache import RunCache, cache_key, weights_fingerprint
from xmllm.errors import XmllmError

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.prepared import ExplainSample
    from xmllm.explainers.models import LoadedModel

ANSWER_FILE = "answer.json"


class ModelUnavailable(XmllmError):
    """The model cannot be loaded: every result needing it fails, so a build stops at once."""


def sample_hash(sample: "ExplainSample") -> str:
    from .provenance import sample_sha256

    return sample_sha256(sample.images, sample.question)


@dataclass
class ModelSession:
    """The model named by ``spec``, its cache, and the seconds spent loading it (if it was)."""

    spec: str
    cache: RunCache
    device: str = "auto"
    seed: int = 0
    threads: int | None = None
    """Torch threads for the model's work (None: torch's default). Set when the model loads and put
    back by :meth:`close`: float sums split across threads add up in another order, so a build fixes
    the count to give the same digits whichever of its processes computes a result."""
    _loaded: "LoadedModel | None" = field(default=None, repr=False)
    _weights: str | None = field(default=None, repr=False)
    load_seconds: float = 0.0
    _threads_before: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._weights = weights_fingerprint(self.spec)

    @property
    def weights(self) -> str:
        """The weights' SHA-256; a hub model is loaded for it, and one without a hash disables caching."""
        if self._weights is None:
            self._weights = self.loaded().weights_sha256
            if self._weights is None:
                self.cache.enabled = False
                self._weights = "unhashed"
        return self._weights

    @property
    def loaded_now(self) -> bool:
        return self._loaded is not None

    def loaded(self) -> "LoadedModel":
        """The model, loaded on first use with eager attention (which every explainer can use)."""
        if self._loaded is None:
            from xmllm.explainers.models import load_model
            from xmllm.explainers.models.errors import ModelLoadError

            t = time.perf_counter()
            if self.threads is not None:
                import torch

                self._threads_before = torch.get_num_threads()
                torch.set_num_threads(self.threads)
            try:
                self._loaded = load_model(self.spec, device=self.device, eager_attention=True)
            except ModelLoadError as exc:
                raise ModelUnavailable(f"--model {self.spec}: {exc}") from None
            self.load_seconds = time.perf_counter() - t
        return self._loaded

    def close(self) -> None:
        """Put torch's thread count back as it was before the model loaded."""
        if self._threads_before is not None:
            import torch

            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def key(self, sample_sha: str, explainer: str, params: dict[str, Any] | None = None) -> str:
        """A result's cache key; a fixed thread count is part of it (it fixes the last digits)."""
        extra = {"params": params or {}, "seed": self.seed, "device": self.device}
        if self.threads is not None:
            extra["threads"] = self.threads
        return cache_key(self.weights, sample_sha, explainer, extra)

    def cached(self, sample_sha: str, explainer: str, params: dict[str, Any] | None,
               build: Callable[[Path], None]) -> tuple[Path, bool]:
        """The run folder for the key, built by ``build(folder)`` if missing; and whether it was cached."""
        key = self.key(sample_sha, explainer, params)
        hit = self.cache.get(key) is not None
        return self.cache.get_or_build(key, build), hit

    def run(self, sample: "ExplainSample", explainer: str, params: dict[str, Any] | None = None,
            key_extra: dict[str, Any] | None = None) -> tuple[Path, bool]:
        """One sample-scope explainer on ``sample``: a run folder as ``RunResult.save`` writes it.

        ``key_extra`` adds what else the result depends on to the cache key (say, the hash of a
        second checkpoint's weights)."""
        from .pipeline import make_plan
        from .runner import run_explainers

        plan = make_plan([explainer], {explainer: dict(params or {})}, seed=self.seed)

        def build(folder: Path) -> None:
            result = run_explainers(self.loaded(), sample, plan)
            result.save(folder, report=False)  # reports are rendered and cached apart

        key_params = {**(params or {}), **({"key_extra": key_extra} if key_extra else {})}
        return self.cached(sample_hash(sample), explainer, key_params, build)

    def answer(self, sample: "ExplainSample") -> dict[str, Any]:
        """The model's greedy answer to ``sample`` (``Answer.to_json()``), cached like a run."""
        def build(folder: Path) -> None:
            from xmllm.explainers.answering import generate_answer

            got = generate_answer(self.loaded(), sample.images, sample.question)
            (folder / ANSWER_FILE).write_text(json.dumps(got.to_json(), sort_keys=True), encoding="utf-8")

        folder, _ = self.cached(sample_hash(sample), "answer", None, build)
        return json.loads((folder / ANSWER_FILE).read_text(encoding="utf-8"))
