"""InternVL (3 / 3.5): GotOcr2's image processor cuts an image into tiles of the vision
encoder's size (the canvas whose aspect ratio is closest, within min/max tiles) plus a thumbnail;
each tile's patches (class token dropped) are pixel-shuffled by ``downsample_ratio`` into a square
of decoder tokens, all between ``<img>`` and ``</img>``; a Qwen2 decoder."""
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
)

PATCH = 4
RATIO = 0.5
MAX_TILES = 6
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""InternVL's (Qwen2's) turn markup with its image placeholder (the processor expands it)."""


@tiny_family("internvl", image_size=(64, 40))  # 3 x 2 tiles and a thumbnail
def build(model_type: str):
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVisionConfig,
        Qwen2Config,
    )
    from transformers.video_processing_utils import BaseVideoProcessor

    tokenizer = bpe_tokenizer(
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named={"start_image_token": "<img>", "end_image_token": "</img>",
               "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},  # fmt: skip
        extra=("<|im_start|>",),
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=MAX_TILES,
    )
    tokens_per_tile = int((VISION_IMAGE_SIZE // PATCH * RATIO) ** 2)
    processor = image_only(InternVLProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=BaseVideoProcessor(),
        image_seq_length=tokens_per_tile,
        chat_template=TEMPLATE,
    )
    vision = InternVLVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=[VISION_IMAGE_SIZE, VISION_IMAGE_SIZE],
        patch_size=[PATCH, PATCH],
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
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=processor.image_token_id,
        image_seq_length=tokens_per_tile,
        downsample_ratio=RATIO,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return seeded(lambda: InternVLForConditionalGeneration(config)), processor
