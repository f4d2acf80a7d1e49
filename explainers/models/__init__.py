"""Models for the explainers: ``load_model`` and one adapter per model family.

An adapter turns a family's config, processor and inputs into what every explainer needs:
the sequence positions of each image's patch grids, the text positions, named hook points and
the prompt built through the processor's own chat template. Nothing is hard-coded per
checkpoint: grid sizes, token counts and offsets come from the config, the processor and the
actual ``input_ids``.
"""
from .adapters import ModelAdapter, adapter_for, supported_model_types
from .errors import AdapterError, ModelLoadError, UnsupportedModelError
from .layout import FULL_IMAGE, ImageLayout, PatchGrid, Region
from .loading import LoadedModel, load_model, resolve_device, resolve_dtype, weights_sha256

__all__ = [
    "FULL_IMAGE",
    "AdapterError",
    "ImageLayout",
    "LoadedModel",
    "ModelAdapter",
    "ModelLoadError",
    "PatchGrid",
    "Region",
    "UnsupportedModelError",
    "adapter_for",
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "supported_model_types",
    "weights_sha256",
]
