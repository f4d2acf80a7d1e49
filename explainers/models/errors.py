"""One-line, user-facing errors of model loading and model adapters."""
from __future__ import annotations

from xmllm import XmllmError


class ModelLoadError(XmllmError):
    """A model spec that cannot be loaded: a missing folder, missing weights, an uncached hub id."""


class UnsupportedModelError(XmllmError):
    """A model whose family (``config.model_type``) has no adapter."""


class AdapterError(XmllmError):
    """Inputs or a model layout that an adapter cannot map to image and text positions."""
