"""Ovis2: a thumbnail then (past one tile) the image's tiles row-major, each a SigLIP-like tile
whose patches fuse ``hidden_stride`` x ``hidden_stride`` into one visual token: a softmax over a
visual vocabulary embedded by a table; ``<IMG_START>``, ``<IMG_GRID>``, ``<IMG_COL>``,
``<IMG_ROW>`` and ``<IMG_END>`` frame them (indicator tokens with embeddings of their own)."""
from __future__ import annotations

from tiny_parts import (
    HEADS,
    HIDDEN,
    INTERMEDIATE,
    LAYERS,
    MAX_POSITIONS,
    VISION_IMAGE_SIZE,
    bpe_tokenizer,
    seeded,
    tiny_family,
)

PATCH = 4
STRIDE = 2
MAX_TILES = 6
INDICATORS = ("<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>")
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Ovis2's (Qwen2's) turn markup with its ``<image>`` placeholder."""


@tiny_family("ovis2", image_size=(64, 40))  # a thumbnail and 2 x 1 tiles
def build(model_type: str):
    from transformers import (
        Ovis2Config,
        Ovis2ForConditionalGeneration,
        Ovis2ImageProcessorPil,
        Ovis2Processor,
        Ovis2VisionConfig,
        Qwen2Config,
    )

    tokenizer = bpe_tokenizer(
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra=("<|im_start|>", "<image>", "<IMG_ATOM>", *INDICATORS),
    )
    image_processor = Ovis2ImageProcessorPil(
        size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=MAX_TILES,
    )
    tokens_per_tile = (VISION_IMAGE_SIZE // PATCH // STRIDE) ** 2
    processor = Ovis2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=TEMPLATE,
        image_seq_length=tokens_per_tile,
    )
    vision = Ovis2VisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=VISION_IMAGE_SIZE,
        patch_size=PATCH,
        vocab_size=64,  # the visual vocabulary (indicator embeddings included)
        hidden_stride=STRIDE,
        num_visual_indicator_tokens=len(INDICATORS),
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
    config = Ovis2Config(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_ATOM>"),
        visual_indicator_token_ids=tokenizer.convert_tokens_to_ids(list(INDICATORS)),
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
    )
    return seeded(lambda: Ovis2ForConditionalGeneration(config)), processor
