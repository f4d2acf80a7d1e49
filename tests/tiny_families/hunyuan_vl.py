"""HunYuan-VL: flattened patches in raster order with ``image_grid_thw``; a ViT whose merger
convolves each ``merge x merge`` block into one token, ends every merged row with a learned newline
feature and puts learned begin/end features around the image, all written over the image token
(``<image>`` between the tokenizer's image start/end tokens); a dense decoder with XD-RoPE over
four axes."""
from __future__ import annotations

import transformers
from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, VISION_IMAGE_SIZE, bpe_tokenizer
from tiny_parts import seeded, thw_image_processor, tiny_family

PATCH = 4
MERGE = 2
TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<hy_image_start><hy_image><hy_image_end>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@tiny_family("hunyuan_vl", image_size=(64, 40))
def build(model_type: str):
    tokenizer = bpe_tokenizer(
        bos=None,
        eos="<|end|>",
        pad="<|pad|>",
        named={"image_token": "<hy_image>", "image_start_token": "<hy_image_start>",
               "image_end_token": "<hy_image_end>"},  # fmt: skip
        extra=("<|user|>", "<|assistant|>", "<hy_image_newline>"),
    )
    image_processor = thw_image_processor(transformers.HunYuanVLImageProcessorPil, PATCH, MERGE)
    processor = transformers.HunYuanVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=TEMPLATE
    )
    vision = transformers.HunYuanVLVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        out_hidden_size=HIDDEN,
        text_hidden_size=HIDDEN,
        max_image_size=VISION_IMAGE_SIZE,
        min_image_size=PATCH * MERGE,
    )
    text = transformers.HunYuanVLTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HIDDEN // HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2, 2]},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<hy_image>"), ("im_start_id", "<hy_image_start>"), ("im_end_id", "<hy_image_end>"),
        ("im_newline_id", "<hy_image_newline>"))}  # fmt: skip
    config = transformers.HunYuanVLConfig(vision_config=vision, text_config=text, **ids)

    def make():
        model = transformers.HunYuanVLForConditionalGeneration(config)
        merger = model.model.vision_tower.patch_merger  # learned features the random init leaves empty
        for feature in (merger.image_newline, merger.image_begin, merger.image_end, merger.image_sep):
            feature.data.normal_(std=0.02)
        return model

    return seeded(make), processor
