"""GLM-5.3-Flash (glm5_next): GLM-4.1V's ``image_grid_thw`` patches (GLM-V's processor and image
processor), a GLM-OCR-like vision tower whose merge windows a strided convolution pools, in front
of a decoder of linear-attention (KDA) and DSA-indexed MLA blocks with hyper-connections and MoE."""
from __future__ import annotations

import transformers
from tiny_families.glm4v import MERGE, PATCH, TEMPORAL, glm_ids, glm_processor
from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, VISION_IMAGE_SIZE
from tiny_parts import seeded, tiny_family


@tiny_family("glm5_next", image_size=(64, 40))
def build(model_type: str):
    processor = glm_processor(transformers.Glm5NextProcessor, transformers.Glm5NextImageProcessorPil)
    tokenizer = processor.tokenizer
    vision = transformers.Glm5NextVisionConfig(
        depth=LAYERS,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        out_hidden_size=HIDDEN,
        projection_intermediate_size=INTERMEDIATE,
        num_heads=HEADS,
        image_size=VISION_IMAGE_SIZE,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
    )
    text = transformers.Glm5NextTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        moe_intermediate_size=INTERMEDIATE // 2,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        q_lora_rank=HIDDEN // 2,
        kv_lora_rank=HIDDEN // 2,
        qk_nope_head_dim=HIDDEN // HEADS,
        v_head_dim=HIDDEN // HEADS,
        n_routed_experts=4,
        num_experts_per_tok=2,
        index_topk=16,
        index_kpool=4,
        index_head_dim=HIDDEN // HEADS,
        index_n_heads=HEADS,
        linear_head_dim=HIDDEN // HEADS,
        linear_num_heads=HEADS,
        hc_mult=2,
        hc_sinkhorn_iters=3,
        mlp_layer_types=["dense", "sparse"][:LAYERS],
        layer_types=["linear_attention", "indexed_attention"][:LAYERS],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    ids = glm_ids(tokenizer)
    config = transformers.Glm5NextConfig(vision_config=vision, text_config=text, **ids)
    return seeded(lambda: transformers.Glm5NextForConditionalGeneration(config)), processor
