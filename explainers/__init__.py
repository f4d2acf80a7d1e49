"""Runnable explainers for image-text-to-text models, the model adapters they rely on,
and the embedded demo world and model."""
from .ids import KNOWN_EXPLAINER_IDS
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

__all__ = [
    "KNOWN_EXPLAINER_IDS",
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
