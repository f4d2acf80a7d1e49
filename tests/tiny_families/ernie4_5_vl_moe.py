"""ERNIE-4.5-VL (MoE): Qwen2-VL-style flattened patches and ``image_grid_thw`` (one frame per
patch), a resampler that merges each ``2 x 2`` window (and, for an image, pairs the frame with
itself), the image between its start and end tokens; a decoder with a dense first block, then
text and vision experts chosen per token by ``moe_mm_token_type_ids``, and 3-D RoPE."""
from __future__ import annotations

import transformers
from tiny_families.glm4v import MERGE, PATCH, glm_image_processor
from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, bpe_tokenizer, image_only, seeded
from tiny_parts import tiny_family

NAMED = {"image_token": "<|IMAGE_PLACEHOLDER|>", "image_start_token": "<|IMAGE_START|>",
         "image_end_token": "<|IMAGE_END|>", "video_token": "<|VIDEO_PLACEHOLDER|>",
         "video_start_token": "<|VIDEO_START|>", "video_end_token": "<|VIDEO_END|>"}  # fmt: skip
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ 'User: ' if message['role'] == 'user' else 'Assistant: ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


@tiny_family("ernie4_5_vl_moe", image_size=(64, 40))
def build(model_type: str):
    from transformers.video_processing_utils import BaseVideoProcessor

    tokenizer = bpe_tokenizer(bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", named=NAMED)
    image_processor = glm_image_processor(transformers.Ernie4_5_VLMoeImageProcessorPil)
    image_processor.temporal_patch_size = 1
    processor = image_only(transformers.Ernie4_5_VLMoeProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=BaseVideoProcessor(),
        chat_template=TEMPLATE,
    )
    vision = transformers.Ernie4_5_VLMoeVisionConfig(
        depth=LAYERS,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_heads=HEADS,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
    )
    text = transformers.Ernie4_5_VLMoeTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        moe_intermediate_size=[INTERMEDIATE // 2, INTERMEDIATE // 4],
        moe_k=2,
        moe_num_experts=4,
        moe_num_shared_experts=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = transformers.Ernie4_5_VLMoeConfig(
        vision_config=vision, text_config=text, **{f"{name}_id": tokenizer.convert_tokens_to_ids(token)
                                                   for name, token in NAMED.items()}  # fmt: skip
    )
    return seeded(lambda: transformers.Ernie4_5_VLMoeForConditionalGeneration(config)), processor
