"""LightOnOCR: Pixtral's vision tower (each image at its own resolution, patches fused 2 x 2 by a
learned merger), one image token per merged patch and no row markers; a Qwen3 decoder."""
from __future__ import annotations

from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, bpe_tokenizer, seeded, tiny_family

PATCH = 4
MERGE = 2
LONGEST_EDGE = 64
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|image_pad|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""LightOnOCR's (Qwen3's) turn markup with its image placeholder."""


@tiny_family("lighton_ocr", image_size=(64, 40))  # wide: 8 x 5 merged patches
def build(model_type: str):
    from transformers import (
        LightOnOcrConfig,
        LightOnOcrForConditionalGeneration,
        LightOnOcrProcessor,
        PixtralImageProcessorPil,
        PixtralVisionConfig,
        Qwen3Config,
    )

    tokenizer = bpe_tokenizer(
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named={"image_token": "<|image_pad|>", "image_break_token": "<|vision_pad|>",
               "image_end_token": "<|vision_end|>"},  # fmt: skip
        extra=("<|im_start|>",),
    )
    # the processor sizes images in merged patches: the image processor's patch is patch x merge
    image_processor = PixtralImageProcessorPil(size={"longest_edge": LONGEST_EDGE}, patch_size=PATCH * MERGE)
    processor = LightOnOcrProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        chat_template=TEMPLATE,
    )
    vision = PixtralVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=LONGEST_EDGE,  # RoPE positions for every patch of the largest image
        patch_size=PATCH,
    )
    text = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HIDDEN // HEADS,
        max_position_embeddings=MAX_POSITIONS,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LightOnOcrConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=processor.image_token_id,
        spatial_merge_size=MERGE,
    )
    return seeded(lambda: LightOnOcrForConditionalGeneration(config)), processor
