"""One adapter per model family, found by ``config.model_type`` through a registry.

Every module of this package is imported here, so adding a family is adding one file whose
adapter class carries ``@register_adapter`` (modules are discovered, not listed).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from .base import ExtraPlan, GridPlan, ImagePlan, ModelAdapter, lookup_adapter, register_adapter, registered_adapters


for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_module.name}")


def adapter_for(model: Any, processor: Any) -> ModelAdapter:
    """The adapter of ``model``'s family, bound to ``model`` and ``processor``."""
    config = getattr(model, "config", None)
    return lookup_adapter(getattr(config, "model_type", None), config)(model, processor)


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
