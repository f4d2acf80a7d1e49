"""LLaVA-OneVision: SigLIP (no class token, all features kept), any-res tiles unpadded like
LLaVA-NeXT's and bilinearly shrunk past ``anyres_max_N`` tiles, an image_newline after every
row of tiles; a Qwen2 decoder."""
from __future__ import annotations

from tiny_parts import (
    HEADS,
    HIDDEN,
    INTERMEDIATE,
    LAYERS,
    MAX_POSITIONS,
    VISION_IMAGE_SIZE,
    bpe_tokenizer,
    image_only,
    seeded,
    tiny_family,
    vision_kwargs,
)

PATCH = 8
PINPOINTS = [[VISION_IMAGE_SIZE, 2 * VISION_IMAGE_SIZE], [2 * VISION_IMAGE_SIZE, VISION_IMAGE_SIZE],
             [2 * VISION_IMAGE_SIZE, 2 * VISION_IMAGE_SIZE]]  # fmt: skip
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""LLaVA-OneVision's (Qwen2's) turn markup, with LLaVA's ``<image>`` placeholder."""


@tiny_family("llava_onevision", image_size=(56, 40))  # wide: 2 x 2 tiles, unpadded rows
def build(model_type: str):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.video_processing_utils import BaseVideoProcessor

    tokenizer = bpe_tokenizer(
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra=("<|im_start|>", "<image>", "<video>"),
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE},
        image_grid_pinpoints=PINPOINTS,
    )
    side = VISION_IMAGE_SIZE // PATCH
    processor = image_only(LlavaOnevisionProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=BaseVideoProcessor(),
        num_image_tokens=side * side,
        vision_feature_select_strategy="full",
        chat_template=TEMPLATE,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**vision_kwargs(PATCH), vision_use_head=False),
        text_config=text,
        image_token_index=processor.image_token_id,
        video_token_index=processor.video_token_id,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    return seeded(lambda: LlavaOnevisionForConditionalGeneration(config)), processor
