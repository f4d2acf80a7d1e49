"""EXAONE 4.5: a Qwen2.5-VL-style vision tower (windowed attention, patches permuted into windows,
``image_grid_thw``) on Qwen2-VL's image processor, and an EXAONE 4 decoder (sliding and global
layers, 1-D RoPE)."""
from __future__ import annotations

import transformers
from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, seeded, tiny_family


@tiny_family("exaone4_5", image_size=(64, 40))
def build(model_type: str):
    from tiny_models import _QWEN_MERGE, _QWEN_PATCH, _QWEN_TEMPORAL, _qwen_processor

    processor = _qwen_processor(transformers.Exaone4_5_Processor)
    tokenizer = processor.tokenizer
    vision = transformers.Exaone4_5_Config.sub_configs["vision_config"](
        depth=LAYERS,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        out_hidden_size=HIDDEN,
        num_heads=HEADS,
        num_key_value_heads=HEADS,
        patch_size=_QWEN_PATCH,
        spatial_merge_size=_QWEN_MERGE,
        temporal_patch_size=_QWEN_TEMPORAL,
        window_size=2 * _QWEN_PATCH * _QWEN_MERGE,  # windows of 2 x 2 merged tokens: the permutation matters
        fullatt_block_indexes=[LAYERS - 1],
    )
    text = transformers.Exaone4Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        sliding_window=MAX_POSITIONS // 2,
        sliding_window_pattern=LAYERS,  # one sliding layer, then a global one
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = transformers.Exaone4_5_Config(
        vision_config=vision,
        text_config=text,
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
    )
    return seeded(lambda: transformers.Exaone4_5_ForConditionalGeneration(config)), processor
