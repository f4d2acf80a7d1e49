"""LLaVA-OneVision-1.5: a RICE-ViT tower on Qwen2-VL's flattened patches and ``image_grid_thw``
that puts a class token before each frame's patches (dropped before the merger), and a Qwen3
decoder; its processor is EXAONE 4.5's (transformers maps it so)."""
from __future__ import annotations

import transformers
from tiny_parts import HEAD_DIM, HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, seeded, tiny_family


@tiny_family("llava_onevision1_5", image_size=(64, 40))
def build(model_type: str):
    from tiny_models import _QWEN_MERGE, _QWEN_PATCH, _qwen_ids, _qwen_processor

    processor = _qwen_processor(transformers.Exaone4_5_Processor)
    processor.image_processor.temporal_patch_size = 1  # its patch embedding is 2-D: one frame per patch
    tokenizer = processor.tokenizer
    vision = transformers.LlavaOnevision15Config.sub_configs["vision_config"](
        depth=LAYERS,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        out_hidden_size=HIDDEN,
        num_heads=HEADS,
        patch_size=_QWEN_PATCH,
        spatial_merge_size=_QWEN_MERGE,
    )
    text = transformers.Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = transformers.LlavaOnevision15Config(vision_config=vision, text_config=text, **_qwen_ids(processor))
    return seeded(lambda: transformers.LlavaOnevision15ForConditionalGeneration(config)), processor
