"""Qianfan-OCR: InternVL's recipe (GotOcr2's tiles and thumbnail, a class-token ViT, a pixel shuffle
by ``downsample_ratio``) with its own vision tower and processor and a Qwen3 decoder; the chat
template writes ``<image>``, which the processor expands to ``<img><IMG_CONTEXT>...</img>``."""
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
RATIO = 0.5
MAX_TILES = 6
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen's turn markup with the processor's image placeholder."""


@tiny_family("qianfan_ocr", image_size=(64, 40))  # 3 x 2 tiles and a thumbnail
def build(model_type: str):
    from transformers import (
        GotOcr2ImageProcessorPil,
        QianfanOCRConfig,
        QianfanOCRForConditionalGeneration,
        QianfanOCRProcessor,
        QianfanOCRVisionConfig,
        Qwen3Config,
    )

    tokenizer = bpe_tokenizer(
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named={"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"},
        extra=("<|im_start|>", "<image>"),
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=MAX_TILES,
    )
    tokens_per_tile = int((VISION_IMAGE_SIZE // PATCH * RATIO) ** 2)
    processor = QianfanOCRProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=tokens_per_tile,
        chat_template=TEMPLATE,
    )
    vision = QianfanOCRVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=VISION_IMAGE_SIZE,
        patch_size=PATCH,
        drop_path_rate=0.0,
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
    config = QianfanOCRConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=processor.image_token_id,
        image_seq_length=tokens_per_tile,
        downsample_ratio=RATIO,
    )
    return seeded(lambda: QianfanOCRForConditionalGeneration(config)), processor
