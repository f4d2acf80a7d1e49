"""Qwen4-Exp (qwen4_exp): Qwen3-VL's processor, ``image_grid_thw`` and Qwen3.5-MoE's vision tower,
in front of a decoder of gated-delta-net and (QSA-indexed) attention blocks with hyper-connected
residual streams and mixture-of-experts MLPs."""
from __future__ import annotations

import transformers
from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, seeded, tiny_family


@tiny_family("qwen4_exp", image_size=(64, 40))
def build(model_type: str):
    from tiny_models import _QWEN_MERGE, _QWEN_PATCH, _QWEN_TEMPORAL, _qwen_ids, _qwen_processor

    processor = _qwen_processor(transformers.Qwen3VLProcessor)
    tokenizer = processor.tokenizer
    vision = transformers.Qwen4ExpVisionConfig(
        depth=LAYERS,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        out_hidden_size=HIDDEN,
        num_heads=HEADS,
        patch_size=_QWEN_PATCH,
        spatial_merge_size=_QWEN_MERGE,
        temporal_patch_size=_QWEN_TEMPORAL,
        num_position_embeddings=64,
    )
    head_dim = HIDDEN // HEADS
    text = transformers.Qwen4ExpTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        moe_intermediate_size=INTERMEDIATE // 2,
        shared_expert_intermediate_size=INTERMEDIATE // 2,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=head_dim,
        linear_key_head_dim=head_dim,
        linear_value_head_dim=head_dim,
        linear_num_key_heads=HEADS,
        linear_num_value_heads=HEADS,
        hc_count=2,
        hc_lowrank=8,
        indexer_n_heads=HEADS,
        indexer_kv_heads=1,
        indexer_head_dim=head_dim,
        indexer_budget=16,
        indexer_compress_ratio=4,
        layer_types=["linear_attention", "indexed_attention"][:LAYERS],
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                         "mrope_interleaved": True},  # fmt: skip
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = transformers.Qwen4ExpConfig(vision_config=vision, text_config=text, **_qwen_ids(processor))
    return seeded(lambda: transformers.Qwen4ExpForConditionalGeneration(config)), processor
