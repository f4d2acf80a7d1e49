"""Runnable explainers for image-text-to-text models, the model adapters they rely on,
and the embedded demo world and model."""
from .registry import (
    Citation,
    Explainer,
    Need,
    RegistryError,
    describe_all,
    get_explainer,
    register,
    registered,
    status,
)



def __getattr__(name: str):
    """``load_model`` and ``LoadedModel`` without importing torch at package import."""
    if name in ("load_model", "LoadedModel"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'explainers' has no attribute {name!r}")


__all__ = [
    "LoadedModel",
    "load_model",
    "Citation",
    "Explainer",
    "Need",
    "RegistryError",
    "describe_all",
    "get_explainer",
    "register",
    "registered",
    "status",
]
