"""Ovis2.5 (ovis2_5): GLM-4.1V-style ``image_grid_thw`` patches (one frame per patch), a
NaViT-like vision tower that attends in windows of merge units (Qwen2.5-VL's window order), and
Ovis's visual tokenizer: each ``spatial_merge_size`` x ``spatial_merge_size`` window becomes a softmax
over a visual vocabulary embedded by a table; the image between start/end tokens whose embeddings
are learned visual indicators."""
from __future__ import annotations

import transformers
from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, VISION_IMAGE_SIZE, bpe_tokenizer, image_only
from tiny_parts import seeded, thw_image_processor, tiny_family

PATCH = 4
MERGE = 2
NAMED = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
         "image_start_token": "<ovis_image_start>", "image_end_token": "<ovis_image_end>",
         "video_start_token": "<ovis_video_start>", "video_end_token": "<ovis_video_end>"}  # fmt: skip
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|image_pad|>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen's turns with one image placeholder, which the processor frames with the start/end tokens."""


@tiny_family("ovis2_5", image_size=(64, 40))
def build(model_type: str):
    from transformers.video_processing_utils import BaseVideoProcessor

    tokenizer = bpe_tokenizer(bos=None, eos="<|im_end|>", pad="<|endoftext|>", named=NAMED,
                              extra=("<|im_start|>", "<|im_end|>", "<|endoftext|>"))  # fmt: skip
    image_processor = thw_image_processor(transformers.Ovis2_5ImageProcessorPil, PATCH, MERGE)
    processor = image_only(transformers.Ovis2_5Processor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=BaseVideoProcessor(),
        chat_template=TEMPLATE,
    )
    vision = transformers.Ovis2_5VisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=VISION_IMAGE_SIZE,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        window_size=2 * PATCH * MERGE,  # windows of 2 x 2 merge units
        layer_types=["window_attention", "full_attention"][:LAYERS],
        vocab_size=64,  # the visual vocabulary (the four indicators included)
    )
    text = transformers.Qwen3Config(
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
    ids = {f"{name}_id": tokenizer.convert_tokens_to_ids(token) for name, token in NAMED.items()}
    config = transformers.Ovis2_5Config(vision_config=vision, text_config=text, **ids)
    return seeded(lambda: transformers.Ovis2_5ForConditionalGeneration(config)), processor
