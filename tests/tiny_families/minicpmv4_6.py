"""MiniCPM-V 4.6 and 4.7: a SigLIP-like tower fed NaViT-packed patches (``pixel_values`` of shape
``(1, C, P, patches * P)``, one ``(h, w)`` patch grid per view in ``target_sizes``); a window merger
after block ``insert_layer_id`` fuses 2 x 2 patches, the merger MLP 2 x 2 more, so one decoder token
per 4 x 4 patches, row-major; a Qwen3.5 decoder (4.7: canvas M-RoPE pinned by the image markers).

Both configs leave ``image_token_id`` None by default (a checkpoint's config.json sets it) and both
models skip the image features while it is None, so it is set here from the processor, as a
checkpoint does. Slicing is off: the generic adapter reads one packed view per image."""
from __future__ import annotations

import transformers
from tiny_parts import HEAD_DIM, HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, VISION_IMAGE_SIZE
from tiny_parts import bpe_tokenizer, image_only, seeded, tiny_family

PATCH = 4
SCALE = 48  # pixels per side of the resized view's area (the test image becomes 32 x 64: 2 x 4 tokens)
NAMED = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "image_start_token": "<image>",
    "image_end_token": "</image>",
    "slice_start_token": "<slice>",
    "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
}
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|image_pad|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CLASSES = {
    "minicpmv4_6": ("MiniCPMV4_6Config", "MiniCPMV4_6ForConditionalGeneration", "MiniCPMV4_6Processor"),
    "minicpmv4_7": ("MiniCPMV4_7Config", "MiniCPMV4_7ForConditionalGeneration", "MiniCPMV4_7Processor"),
}


@tiny_family(*_CLASSES, image_size=(64, 40))
def build(model_type: str):
    from transformers.video_processing_utils import BaseVideoProcessor

    config_name, model_name, processor_name = _CLASSES[model_type]
    tokenizer = bpe_tokenizer(bos=None, eos="<|im_end|>", pad="<|endoftext|>", named=NAMED,
                              extra=("<|im_start|>",))  # fmt: skip
    image_processor = transformers.MiniCPMV4_6ImageProcessorPil(
        patch_size=PATCH, scale_resolution=SCALE, slice_mode=False
    )
    video_processor = BaseVideoProcessor()  # the family's own needs torchvision; images never touch it
    video_processor.slice_mode, video_processor.downsample_mode = False, "16x"
    processor = image_only(getattr(transformers, processor_name))(
        image_processor=image_processor, video_processor=video_processor, tokenizer=tokenizer, chat_template=TEMPLATE
    )
    config_cls = getattr(transformers, config_name)
    text = transformers.Qwen3_5TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        layer_types=["linear_attention", "full_attention"][:LAYERS],
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = config_cls.sub_configs["vision_config"](
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        image_size=VISION_IMAGE_SIZE, patch_size=PATCH,
    )  # fmt: skip
    ids = {"image_token_id": processor.image_token_id, "video_token_id": processor.video_token_id}
    if model_type == "minicpmv4_7":  # canvas M-RoPE pins the markers: their ids are required with images
        convert = tokenizer.convert_tokens_to_ids
        ids.update(image_start_id=convert("<image>"), image_end_id=convert("</image>"),
                   slice_start_id=convert("<slice>"), slice_end_id=convert("</slice>"),
                   newline_id=tokenizer.encode("\n", add_special_tokens=False)[0])  # fmt: skip
    config = config_cls(vision_config=vision, text_config=text, insert_layer_id=0, **ids)  # merger after block 0
    return seeded(lambda: getattr(transformers, model_name)(config)), processor
