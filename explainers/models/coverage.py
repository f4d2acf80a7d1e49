"""Which model families xmllm serves, and what each explainer does on each: ``xmllm models``.

One source for the command, its JSON and the README's table. Every model type in the installed
transformers' image-text-to-text mapping gets its adapter (``own``, ``generic`` or ``none`` with the
reason), decided from the family's default config as :func:`lookup_adapter` decides it at load, and
per sample-level explainer either nothing (it runs) or the declared refusal its needs meet on that
config. Whether the family is checked on a tiny random model by the test suite is read from
``tested_families.txt`` (a test keeps that list equal to the suite's matrix).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from .adapters import registered_adapters
from .adapters.base import ModelAdapter
from .adapters.generic import GenericAdapter, generic_refusal

TESTED_FILE = "tested_families.txt"


@dataclass(frozen=True)
class FamilyStatus:
    """One model type: how it is served and what each sample-level explainer does on it."""

    model_type: str
    model_class: str
    adapter: str
    """"own", "generic" or "none"."""
    reason: str | None = None
    """Why none serves it (for "none")."""
    tested: bool = False
    """Checked on a tiny random model of the family by the test suite."""
    needs_torchvision: bool = False
    """Its image processor has no PIL backend, so it needs torchvision to run at all."""
    refusals: dict[str, str] = field(default_factory=dict)
    """Explainer id -> its declared refusal on this family (absent: it runs)."""

    @property
    def decoder_style(self) -> bool:
        """Whether the image could enter a decoder's sequence (not an encoder-decoder)."""
        return not (self.reason or "").startswith("encoder-decoder")

    def to_json(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "model_class": self.model_class,
            "adapter": self.adapter,
            "reason": self.reason,
            "tested": self.tested,
            "needs_torchvision": self.needs_torchvision,
            "decoder_style": self.decoder_style,
            "refusals": dict(self.refusals),
        }


@lru_cache(maxsize=1)
def tested_families() -> frozenset[str]:
    """Model types the test suite checks on tiny random models (the package's record of it)."""
    text = resources.files(__package__).joinpath(TESTED_FILE).read_text(encoding="utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def _default_config(model_type: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type)


def _needs_torchvision(model_type: str) -> bool:
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    backends = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type) or {}
    if not isinstance(backends, dict) or not backends or backends.get("pil"):
        return False
    return importlib.util.find_spec("torchvision") is None


def family_status(model_type: str, model_class: str = "") -> FamilyStatus:
    """How ``model_type`` is served, from its default config (no weights, no model built)."""
    from ..registry import sample_level_ids, get_explainer

    own = registered_adapters().get(model_type)
    tested = model_type in tested_families()
    torchvision = _needs_torchvision(model_type)
    try:
        config = _default_config(model_type)
    except Exception as error:  # a config class that cannot build its defaults
        return FamilyStatus(model_type, model_class, "none", f"its default config does not build ({error})".split("\n")[0],
                            tested, torchvision)  # fmt: skip
    cls: type[ModelAdapter]
    if own is not None:
        cls = own
    else:
        why = generic_refusal(config)
        if why is not None:
            return FamilyStatus(model_type, model_class, "none", why, tested, torchvision)
        cls = GenericAdapter
    refusals = {}
    for explainer_id in sample_level_ids():
        for capability in sorted(get_explainer(explainer_id).capabilities_needed(cls.reads_image_through)):
            why = cls.lacks_for_config(config, capability)
            if why is not None:
                refusals[explainer_id] = why
                break
    return FamilyStatus(model_type, model_class, cls.kind, None, tested, torchvision, refusals)


def all_families() -> list[FamilyStatus]:
    """Every model type of the installed transformers' image-text-to-text mapping, sorted."""
    import warnings

    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [family_status(t, str(c)) for t, c in sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.items())]


@dataclass(frozen=True)
class Coverage:
    decoder_style: int
    served: int
    tested: int
    total: int

    def line(self) -> str:
        return (
            f"{self.served} of {self.decoder_style} decoder-style families served (own or generic adapter), "
            f"{self.tested} of them checked on a tiny model by the test suite "
            f"({100 * self.tested / max(self.decoder_style, 1):.0f}%); {self.total} model types in the mapping"
        )


def coverage(rows: list[FamilyStatus]) -> Coverage:
    """The coverage figure: of the decoder-style families, those served and those checked."""
    decoder = [r for r in rows if r.decoder_style]
    served = [r for r in decoder if r.adapter != "none"]
    return Coverage(len(decoder), len(served), sum(1 for r in served if r.tested), len(rows))
