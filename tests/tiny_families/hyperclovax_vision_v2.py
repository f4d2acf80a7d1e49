"""HyperCLOVA X SEED Vision (v2): Qwen2.5-VL's vision tower (attention windows, merged 2 x 2) at
``model.vision_model``, a linear projector, and a HyperCLOVA X decoder with muP multipliers (its
embeddings and logits are scaled: the logit lens must apply the same scale)."""
from __future__ import annotations

import transformers
from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, seeded, tiny_family


@tiny_family("hyperclovax_vision_v2", image_size=(64, 40))
def build(model_type: str):
    from tiny_models import _QWEN_MERGE, _QWEN_PATCH, _QWEN_TEMPORAL, _qwen_processor
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    processor = _qwen_processor(transformers.HyperCLOVAXVisionV2Processor)
    tokenizer = processor.tokenizer
    vision = Qwen2_5_VLVisionConfig(
        depth=LAYERS,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        out_hidden_size=HIDDEN,
        num_heads=HEADS,
        patch_size=_QWEN_PATCH,
        spatial_merge_size=_QWEN_MERGE,
        temporal_patch_size=_QWEN_TEMPORAL,
        window_size=2 * _QWEN_PATCH * _QWEN_MERGE,  # windows of 2 x 2 merged tokens
        fullatt_block_indexes=[LAYERS - 1],
    )
    text = transformers.HyperCLOVAXConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        embedding_multiplier=2.0,  # muP scales, not 1, so that a read-out forgetting them is caught
        logits_scaling=0.5,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = transformers.HyperCLOVAXVisionV2Config(
        vision_config=vision,
        text_config=text,
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
    )
    return seeded(lambda: transformers.HyperCLOVAXVisionV2ForConditionalGeneration(config)), processor
