"""Cosmos3 Edge: Qwen2-VL's flattened patches and ``image_grid_thw`` (temporal patch 1) on a
SigLIP2-style tower with learned reference position embeddings, a 2 x 2 patch merger, a Llama-style
decoder with interleaved-section MRoPE and a non-gated ``fc1``/``fc2`` MLP (squared ReLU)."""
from __future__ import annotations

import transformers
from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, bpe_tokenizer, image_only
from tiny_parts import seeded, thw_image_processor, tiny_family

PATCH = 4
MERGE = 2
SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@tiny_family("cosmos3_edge", image_size=(64, 40))
def build(model_type: str):
    from transformers.video_processing_utils import BaseVideoProcessor

    tokenizer = bpe_tokenizer(bos=None, eos="<|im_end|>", pad="<|endoftext|>", extra=SPECIALS)
    image_processor = thw_image_processor(transformers.Cosmos3EdgeImageProcessorPil, PATCH, MERGE)
    processor = image_only(transformers.Cosmos3EdgeProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=BaseVideoProcessor(),
        chat_template=TEMPLATE,
    )
    vision = transformers.Cosmos3EdgeVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        patch_size=PATCH,
        num_patches=64,
        spatial_merge_size=MERGE,
    )
    text = transformers.Cosmos3EdgeTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HIDDEN // HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}  # fmt: skip
    config = transformers.Cosmos3EdgeConfig(
        vision_config=vision, text_config=text, projector_hidden_size=INTERMEDIATE, **ids
    )
    return seeded(lambda: transformers.Cosmos3EdgeForConditionalGeneration(config)), processor
