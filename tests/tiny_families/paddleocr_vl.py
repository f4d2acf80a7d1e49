"""PaddleOCR-VL: a NaViT-style SigLIP tower fed its patches row-major (not merge window by merge
window, as Qwen2-VL's are) with ``image_grid_thw``; the projector gathers each ``2 x 2`` window
itself; an ERNIE-4.5 decoder with multimodal RoPE."""
from __future__ import annotations

import transformers
from tiny_families.glm4v import MERGE, PATCH, glm_image_processor
from tiny_parts import HEAD_DIM, HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, VISION_IMAGE_SIZE, bpe_tokenizer
from tiny_parts import seeded, tiny_family

SPECIALS = ("<|IMAGE_START|>", "<|IMAGE_END|>", "<|video_pad|>", "User:", "Assistant:")
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ 'User: ' if message['role'] == 'user' else 'Assistant: ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


@tiny_family("paddleocr_vl", image_size=(64, 40))
def build(model_type: str):
    tokenizer = bpe_tokenizer(bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
                              named={"image_token": "<|IMAGE_PLACEHOLDER|>"}, extra=SPECIALS)  # fmt: skip
    image_processor = glm_image_processor(transformers.PaddleOCRVLImageProcessorPil)
    image_processor.temporal_patch_size = 1
    processor = transformers.PaddleOCRVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=TEMPLATE
    )
    vision = transformers.PaddleOCRVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=VISION_IMAGE_SIZE,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
    )
    text = transformers.PaddleOCRTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = transformers.PaddleOCRVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|IMAGE_START|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|IMAGE_END|>"),
    )
    return seeded(lambda: transformers.PaddleOCRVLForConditionalGeneration(config)), processor
