"""The backward toolkit: what every explainer that differentiates the model shares."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


@contextlib.contextmanager
def inputs_only_gradients(model: torch.nn.Module) -> Iterator[None]:
    """Stop parameters requiring gradients for the duration: no weight gradients are wanted, and
    autograd then keeps far fewer activations. Restored on exit."""
    changed = [p for p in model.parameters() if p.requires_grad]
    for weight in changed:
        weight.requires_grad_(False)
    try:
        yield
    finally:
        for weight in changed:
            weight.requires_grad_(True)


def default_cam_layer(adapter: Any) -> int:
    """The last vision block whose output reaches the decoder: LLaVA-style configs read
    ``vision_feature_layer`` of the tower's hidden states (index 0: the embeddings)."""
    count = len(adapter.vision_layers())
    feature_layer = getattr(adapter.config, "vision_feature_layer", None)
    if isinstance(feature_layer, (list, tuple)) and feature_layer:
        indices = [count + 1 + i if i < 0 else i for i in feature_layer]
        feature_layer = max(indices)
    if isinstance(feature_layer, int):
        state = count + 1 + feature_layer if feature_layer < 0 else feature_layer
        if 1 <= state <= count:
            return state - 1
    return count - 1
