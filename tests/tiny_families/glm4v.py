"""GLM-4.1V / GLM-4.5V (glm4v) and GLM-4.6V (glm46v): Qwen2-VL's flattened patches and
``image_grid_thw``, a vision tower with interpolated learned position embeddings and a strided
convolution over each merge window, the image between ``<|begin_of_image|>`` and ``<|end_of_image|>``."""
from __future__ import annotations

import transformers
from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, VISION_IMAGE_SIZE, bpe_tokenizer, image_only
from tiny_parts import seeded, thw_image_processor, tiny_family

PATCH = 4
MERGE = 2
TEMPORAL = 2
SPECIALS = ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>", "<|image|>", "<|video|>",
            "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>")  # fmt: skip
TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CLASSES = {
    "glm4v": ("Glm4vConfig", "Glm4vForConditionalGeneration", "Glm4vProcessor", "Glm4vImageProcessorPil"),
    "glm46v": ("Glm46VConfig", "Glm46VForConditionalGeneration", "Glm46VProcessor", "Glm46VImageProcessorPil"),
}


def glm_image_processor(image_processor_cls):
    """The GLM-V image processor at the tiny sizes."""
    return thw_image_processor(image_processor_cls, PATCH, MERGE, temporal_patch_size=TEMPORAL)


def glm_processor(processor_cls, image_processor_cls):
    """The GLM-V processor at the tiny sizes, with its special tokens and chat template (its video
    part a bare one: the family's own needs torchvision, images never touch it)."""
    from transformers.video_processing_utils import BaseVideoProcessor

    tokenizer = bpe_tokenizer(bos=None, eos="<|endoftext|>", pad="<|endoftext|>", extra=SPECIALS)
    return image_only(processor_cls)(
        image_processor=glm_image_processor(image_processor_cls),
        tokenizer=tokenizer,
        video_processor=BaseVideoProcessor(),
        chat_template=TEMPLATE,
    )


def glm_vision(vision_cls, **extra):
    """A GLM-V vision tower config at the tiny sizes."""
    return vision_cls(depth=LAYERS, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, out_hidden_size=HIDDEN,
                      num_heads=HEADS, image_size=VISION_IMAGE_SIZE, patch_size=PATCH, spatial_merge_size=MERGE,
                      temporal_patch_size=TEMPORAL, **extra)  # fmt: skip


def glm_text(text_cls, tokenizer, **extra):
    """A GLM decoder config at the tiny sizes (3-axis MRoPE over the head)."""
    return text_cls(
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
        **extra,
    )


def glm_ids(tokenizer) -> dict[str, int]:
    """The image and video token ids a GLM-V config names, from the tokenizer."""
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image|>"), ("video_token_id", "<|video|>"),
        ("image_start_token_id", "<|begin_of_image|>"), ("image_end_token_id", "<|end_of_image|>"),
        ("video_start_token_id", "<|begin_of_video|>"), ("video_end_token_id", "<|end_of_video|>"))}  # fmt: skip


@tiny_family(*_CLASSES, image_size=(64, 40))
def build(model_type: str):
    config_name, model_name, processor_name, image_processor_name = _CLASSES[model_type]
    processor = glm_processor(getattr(transformers, processor_name), getattr(transformers, image_processor_name))
    tokenizer = processor.tokenizer
    vision = glm_vision(transformers.Glm4vVisionConfig)
    text = glm_text(transformers.Glm4vTextConfig, tokenizer)
    config = getattr(transformers, config_name)(vision_config=vision, text_config=text, **glm_ids(tokenizer))
    return seeded(lambda: getattr(transformers, model_name)(config)), processor
