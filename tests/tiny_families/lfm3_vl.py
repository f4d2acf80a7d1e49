"""LFM3-VL: Qwen2-VL's image processor and ``image_grid_thw``; a vision tower of gated depthwise
convolutions over each frame's patch grid and attention blocks; a projector merging each
``2 x 2`` window; an LFM3 decoder whose blocks are short convolutions or attention."""
from __future__ import annotations

import transformers
from tiny_parts import HEAD_DIM, HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, seeded, tiny_family

LAYER_TYPES = ["conv", "full_attention"]  # one of each kind, in both the tower and the decoder


@tiny_family("lfm3_vl", image_size=(64, 40))
def build(model_type: str):
    from tiny_models import _QWEN_MERGE, _QWEN_PATCH, _QWEN_TEMPORAL, _qwen_ids, _qwen_processor

    processor = _qwen_processor(transformers.Lfm3VlProcessor)
    tokenizer = processor.tokenizer
    vision = transformers.Lfm3VlConfig.sub_configs["vision_config"](
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        patch_size=_QWEN_PATCH,
        spatial_merge_size=_QWEN_MERGE,
        temporal_patch_size=_QWEN_TEMPORAL,
        layer_types=LAYER_TYPES[:LAYERS],
    )
    text = transformers.Lfm3Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        layer_types=LAYER_TYPES[:LAYERS],
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = transformers.Lfm3VlConfig(
        vision_config=vision, text_config=text, projector_hidden_size=HIDDEN, **_qwen_ids(processor)
    )
    return seeded(lambda: transformers.Lfm3VlForConditionalGeneration(config)), processor
