"""GOT-OCR 2: a SAM-style vision encoder (windowed attention, a convolutional neck) and a
projector of two stride-2 3x3 convolutions, so one decoder token per 4 x 4 patches; GotOcr2's
tiles and thumbnail (``crop_to_patches``); a Qwen2 decoder. The processor has no chat template
(the checkpoint has none): the template here writes its ``<img>...</img>`` frame."""
from __future__ import annotations

from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, bpe_tokenizer, seeded, tiny_family

PATCH = 4
TILE = 64  # the encoder's input: 16 x 16 patches, 4 x 4 tokens after the projector's two strides
MAX_TILES = 4
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<img><imgpad></img>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The turn markup GotOcr2Processor writes itself when given no text."""


@tiny_family("got_ocr2", image_size=(96, 48))  # 2 x 1 tiles and a thumbnail
def build(model_type: str):
    from transformers import (
        GotOcr2Config,
        GotOcr2ForConditionalGeneration,
        GotOcr2ImageProcessorPil,
        GotOcr2Processor,
        GotOcr2VisionConfig,
        Qwen2Config,
    )

    tokenizer = bpe_tokenizer(
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", extra=("<|im_start|>", "<img>", "</img>", "<imgpad>")
    )
    image_processor = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE})
    processor = GotOcr2Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=TEMPLATE)
    tokens_per_tile = (TILE // PATCH // 4) ** 2
    processor.num_image_tokens = tokens_per_tile  # the processor's setting (256 for 1024-pixel tiles)
    processor.images_kwargs = {"crop_to_patches": True, "min_patches": 1, "max_patches": MAX_TILES}
    vision = GotOcr2VisionConfig(
        hidden_size=HIDDEN,
        output_channels=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=TILE,
        patch_size=PATCH,
        window_size=4,
        global_attn_indexes=[LAYERS - 1],
        mlp_dim=INTERMEDIATE,
        initializer_range=0.02,  # the config's 1e-10 leaves a random tower blind to its pixels
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
    config = GotOcr2Config(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        image_seq_length=tokens_per_tile,
    )
    return seeded(lambda: GotOcr2ForConditionalGeneration(config)), processor
