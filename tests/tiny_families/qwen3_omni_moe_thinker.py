"""Qwen3-Omni's thinker (qwen3_omni_moe_thinker): the omni model's text-generating half, with
Qwen3-VL's vision tower (learned position embeddings, deepstack mergers) and ``image_grid_thw``
through Qwen3-Omni's processor, an MoE decoder, and an audio tower the image never touches."""
from __future__ import annotations

import transformers
from tiny_families.qwen2_5_omni_thinker import MERGE, PATCH, TEMPORAL, audio_kwargs, omni_processor, text_kwargs
from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, seeded, tiny_family

NAMED = {"image_token": "<|image_pad|>", "audio_token": "<|audio_pad|>", "video_token": "<|video_pad|>",
         "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
         "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>"}  # fmt: skip
"""Qwen3-Omni's names for its special tokens (the processor reads them off the tokenizer)."""


@tiny_family("qwen3_omni_moe_thinker", image_size=(64, 40))
def build(model_type: str):
    processor = omni_processor(transformers.Qwen3OmniMoeProcessor, NAMED)
    tokenizer = processor.tokenizer
    sub = transformers.Qwen3OmniMoeThinkerConfig.sub_configs
    vision = sub["vision_config"](
        depth=LAYERS,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        out_hidden_size=HIDDEN,
        num_heads=HEADS,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0],
    )
    text = sub["text_config"](
        **text_kwargs(tokenizer),
        head_dim=HIDDEN // HEADS,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=INTERMEDIATE // 2,
    )
    config = transformers.Qwen3OmniMoeThinkerConfig(
        audio_config=sub["audio_config"](**audio_kwargs(), downsample_hidden_size=8, n_window_infer=8, conv_chunksize=8),
        vision_config=vision,
        text_config=text,
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
        audio_token_id=processor.audio_token_id,
        audio_start_token_id=tokenizer.convert_tokens_to_ids(NAMED["audio_bos_token"]),
        user_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        # the checkpoint's config carries these too: its rope index finds each image by them
        vision_start_token_id=tokenizer.convert_tokens_to_ids(NAMED["vision_bos_token"]),
        vision_end_token_id=tokenizer.convert_tokens_to_ids(NAMED["vision_eos_token"]),
    )
    return seeded(lambda: transformers.Qwen3OmniMoeThinkerForConditionalGeneration(config)), processor
