"""Where a tiny model puts its image features, asked of the model rather than the adapter."""
from __future__ import annotations

import torch

from xmllm.explainers.models.adapters.generic import GenericAdapter, _feature_count, image_feature_getter


def _cross_attended_tokens(loaded, inputs) -> int:
    """Vision tokens the model's own vision tower and projector make for its cross-attention."""
    base = loaded.model.model
    with torch.no_grad():
        states = base.vision_model(pixel_values=inputs["pixel_values"], aspect_ratio_ids=inputs["aspect_ratio_ids"],
                                   aspect_ratio_mask=inputs["aspect_ratio_mask"]).last_hidden_state
        states = base.multi_modal_projector(states)
    return int(states.shape[:-1].numel())


def feature_positions(loaded, inputs) -> tuple[torch.Tensor, int]:
    """``(positions, features)``: the positions the image features take in row 0 and how many
    features the model computes. In the sequence: the image tokens, and the model's own feature
    count. Through cross-attention (no image token holds a feature): one position per
    cross-attended token, numbered after the sequence."""
    adapter = loaded.adapter
    if adapter.reads_image_through == "cross_attention":
        seq, count = inputs["input_ids"].shape[-1], _cross_attended_tokens(loaded, inputs)
        return torch.arange(seq, seq + count), count
    tokens = torch.nonzero(inputs["input_ids"][0] == adapter.image_token_id).flatten()
    keys = {k: v for k, v in inputs.items() if k in GenericAdapter._feature_kwargs(adapter, inputs)}
    with torch.no_grad():
        features = image_feature_getter(loaded.model)(pixel_values=inputs["pixel_values"], **keys)
    return tokens, _feature_count(features)
