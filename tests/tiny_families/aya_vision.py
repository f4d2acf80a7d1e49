"""Aya Vision: GotOcr2's tiles and thumbnail, each a SigLIP tile pixel-shuffled by
``downsample_factor`` into a square of ``<|IMG_PATCH|>`` tokens; the processor names each tile
(``TILE_k``, then ``TILE_GLOBAL`` before the thumbnail) between ``<|START_OF_IMG|>`` and
``<|END_OF_IMG|>``; a Cohere2 decoder (parallel blocks, scaled logits)."""
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
    vision_kwargs,
)

PATCH = 4
DOWNSAMPLE = 2
MAX_TILES = 6
SPECIALS = ("<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
            "<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>")  # fmt: skip
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|START_OF_TURN_TOKEN|>"
    "{{ '<|USER_TOKEN|>' if message['role'] == 'user' else '<|CHATBOT_TOKEN|>' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|END_OF_TURN_TOKEN|>{% endfor %}"
    "{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{% endif %}"
)
"""Aya's (Command R's) turn markup with its ``<image>`` placeholder."""


@tiny_family("aya_vision", image_size=(64, 40))  # 3 x 2 tiles and a thumbnail
def build(model_type: str):
    from transformers import (
        AyaVisionConfig,
        AyaVisionForConditionalGeneration,
        AyaVisionProcessor,
        Cohere2Config,
        GotOcr2ImageProcessorPil,
        SiglipVisionConfig,
    )

    tokenizer = bpe_tokenizer(bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>", pad="<PAD>", extra=SPECIALS)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=MAX_TILES,
    )
    processor = AyaVisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        img_size=VISION_IMAGE_SIZE,
        downsample_factor=DOWNSAMPLE,
        chat_template=TEMPLATE,
    )
    text = Cohere2Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HIDDEN // HEADS,
        max_position_embeddings=MAX_POSITIONS,
        sliding_window=MAX_POSITIONS // 2,
        layer_types=["sliding_attention", "full_attention"][:LAYERS],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = AyaVisionConfig(
        vision_config=SiglipVisionConfig(**vision_kwargs(PATCH), vision_use_head=False),
        text_config=text,
        image_token_index=processor.image_token_id,
        downsample_factor=DOWNSAMPLE,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        # tied, a random Cohere2 this small answers by repeating the prompt's last (special) token
        tie_word_embeddings=False,
    )
    return seeded(lambda: AyaVisionForConditionalGeneration(config)), processor
