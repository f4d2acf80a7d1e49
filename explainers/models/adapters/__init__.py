"""One adapter per model family, found by ``config.model_type`` through a registry."""
from __future__ import annotations

from typing import Any

from . import gemma3, idefics3, llava, llava_next, paligemma, qwen2_vl  # noqa: F401  (register)
from .base import ExtraPlan, GridPlan, ImagePlan, ModelAdapter, lookup_adapter, register_adapter, registered_adapters


def adapter_for(model: Any, processor: Any) -> ModelAdapter:
    """The adapter of ``model``'s family, bound to ``model`` and ``processor``."""
    return lookup_adapter(getattr(getattr(model, "config", None), "model_type", None))(model, processor)


def supported_model_types() -> tuple[str, ...]:
    return tuple(registered_adapters())


__all__ = [
    "ExtraPlan",
    "GridPlan",
    "ImagePlan",
    "ModelAdapter",
    "adapter_for",
    "register_adapter",
    "registered_adapters",
    "supported_model_types",
]
