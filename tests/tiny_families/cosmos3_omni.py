"""Cosmos3 Omni's reasoner (cosmos3_omni): Qwen3-VL's architecture under a config of its own
(its checkpoint's generator, sound and action towers are dropped on load), served through
Qwen3-VL's processor and image processor, as its checkpoint names them."""
from __future__ import annotations

import transformers
from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, seeded, tiny_family


@tiny_family("cosmos3_omni", image_size=(64, 40))
def build(model_type: str):
    from tiny_models import _QWEN_MERGE, _QWEN_PATCH, _QWEN_TEMPORAL, _qwen_ids, _qwen_processor

    processor = _qwen_processor(transformers.Qwen3VLProcessor)
    tokenizer = processor.tokenizer
    vision = transformers.Qwen3VLVisionConfig(
        depth=LAYERS,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        out_hidden_size=HIDDEN,
        num_heads=HEADS,
        patch_size=_QWEN_PATCH,
        spatial_merge_size=_QWEN_MERGE,
        temporal_patch_size=_QWEN_TEMPORAL,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0],
    )
    text = transformers.Qwen3VLTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HIDDEN // HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                         "mrope_interleaved": True},  # fmt: skip
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = transformers.Cosmos3OmniConfig(vision_config=vision, text_config=text, **_qwen_ids(processor))
    return seeded(lambda: transformers.Cosmos3OmniForConditionalGeneration(config)), processor
