"""Cohere Compass (North Vision): Qwen3-VL's tower, grids and deepstack mergers on Qwen2-VL's
image processor, a Cohere2 decoder (parallel attention and MLP, scaled logits, interleaved MRoPE);
the processor writes ``<|IMAGE_PAD|>`` between ``<|VISION_START|>`` and ``<|VISION_END|>``."""
from __future__ import annotations

import transformers
from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, bpe_tokenizer, image_only
from tiny_parts import seeded, thw_image_processor, tiny_family

PATCH = 4
MERGE = 2
TEMPORAL = 2
SPECIALS = ("<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
            "<|VISION_START|>", "<|VISION_END|>", "<|IMAGE_PAD|>", "<|VIDEO_PAD|>")  # fmt: skip
TEMPLATE = (
    "{% for message in messages %}<|START_OF_TURN_TOKEN|>"
    "{% if message['role'] == 'user' %}<|USER_TOKEN|>{% else %}<|CHATBOT_TOKEN|>{% endif %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|VISION_START|><|IMAGE_PAD|><|VISION_END|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|END_OF_TURN_TOKEN|>{% endfor %}"
    "{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{% endif %}"
)


@tiny_family("cohere_compass", image_size=(64, 40))
def build(model_type: str):
    from transformers.video_processing_utils import BaseVideoProcessor

    tokenizer = bpe_tokenizer(bos=None, eos="<|END_OF_TURN_TOKEN|>", pad="<PAD>", extra=SPECIALS)
    image_processor = thw_image_processor(transformers.CohereCompassImageProcessorPil, PATCH, MERGE,
                                          temporal_patch_size=TEMPORAL)
    processor = image_only(transformers.CohereCompassProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=BaseVideoProcessor(),
        chat_template=TEMPLATE,
    )
    vision = transformers.CohereCompassVisionConfig(
        depth=LAYERS,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        out_hidden_size=HIDDEN,
        num_heads=HEADS,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0],
    )
    text = transformers.CohereCompassTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        logit_scale=0.5,
        layer_types=["sliding_attention", "full_attention"][:LAYERS],
        sliding_window=64,
        rope_parameters={kind: {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                "mrope_interleaved": True} for kind in ("sliding_attention", "full_attention")},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|IMAGE_PAD|>"), ("video_token_id", "<|VIDEO_PAD|>"),
        ("vision_start_token_id", "<|VISION_START|>"), ("vision_end_token_id", "<|VISION_END|>"))}  # fmt: skip
    config = transformers.CohereCompassConfig(vision_config=vision, text_config=text, **ids)
    return seeded(lambda: transformers.CohereCompassForConditionalGeneration(config)), processor
