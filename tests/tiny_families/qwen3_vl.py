"""Qwen3-VL (dense and MoE) and Qwen3.5 (dense and MoE): Qwen2-VL's processor and grid, a vision
tower with learned position embeddings and deepstack mergers, an interleaved-MRoPE decoder."""
from __future__ import annotations

import transformers
from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, seeded, tiny_family

_CLASSES = {
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration"),
    "qwen3_5": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration"),
    "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration"),
}


@tiny_family(*_CLASSES, image_size=(64, 40))
def build(model_type: str):
    from tiny_models import _QWEN_MERGE, _QWEN_PATCH, _QWEN_TEMPORAL, _qwen_ids, _qwen_processor

    config_name, model_name = _CLASSES[model_type]
    processor = _qwen_processor(transformers.Qwen3VLProcessor)
    tokenizer = processor.tokenizer
    config_cls = getattr(transformers, config_name)
    vision = config_cls.sub_configs["vision_config"](
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
    text_kwargs = dict(
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
    if model_type.endswith("moe"):
        text_kwargs.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=INTERMEDIATE // 2)
    text_cls = config_cls.sub_configs["text_config"]
    if "layer_types" in text_cls().to_dict():  # Qwen3.5: linear-attention blocks between full ones
        text_kwargs["layer_types"] = ["linear_attention", "full_attention"][:LAYERS]
    config = config_cls(vision_config=vision, text_config=text_cls(**text_kwargs), **_qwen_ids(processor))
    return seeded(lambda: getattr(transformers, model_name)(config)), processor
