"""GLM-GA (glmga): GLM-4.6V's model and processor behind a config of its own, with an image processor
that can round its sizes to a multiple of an expanded merge window (``patch_expand_factor``)."""
from __future__ import annotations

import transformers
from tiny_families.glm4v import MERGE, PATCH, SPECIALS, TEMPLATE, TEMPORAL, thw_image_processor
from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, VISION_IMAGE_SIZE, bpe_tokenizer, image_only
from tiny_parts import seeded, tiny_family


@tiny_family("glmga", image_size=(64, 40))
def build(model_type: str):
    from transformers.video_processing_utils import BaseVideoProcessor

    tokenizer = bpe_tokenizer(bos=None, eos="<|endoftext|>", pad="<|endoftext|>", extra=SPECIALS)
    processor = image_only(transformers.Glm46VProcessor)(
        image_processor=thw_image_processor(transformers.GlmgaImageProcessorPil),
        tokenizer=tokenizer,
        video_processor=BaseVideoProcessor(),
        chat_template=TEMPLATE,
    )
    vision = transformers.Glm4vVisionConfig(
        depth=LAYERS,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        out_hidden_size=HIDDEN,
        num_heads=HEADS,
        image_size=VISION_IMAGE_SIZE,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
    )
    text = transformers.Glm4vTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                         "partial_rotary_factor": 1.0},  # fmt: skip
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image|>"), ("video_token_id", "<|video|>"),
        ("image_start_token_id", "<|begin_of_image|>"), ("image_end_token_id", "<|end_of_image|>"),
        ("video_start_token_id", "<|begin_of_video|>"), ("video_end_token_id", "<|end_of_video|>"))}  # fmt: skip
    config = transformers.GlmgaConfig(vision_config=vision, text_config=text, **ids)
    return seeded(lambda: transformers.Glm46VForConditionalGeneration(config)), processor
