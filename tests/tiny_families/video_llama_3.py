"""VideoLLaMA 3: a SigLIP-style NaViT tower on Qwen2-VL's flattened patches and ``image_grid_thw``,
each image's ``merge x merge`` windows pooled (bilinear, halving) by the tower itself at the merge
size the processor reports per image (``image_merge_sizes``); a Qwen2 decoder."""
from __future__ import annotations

import transformers
from tiny_families.glm4v import MERGE, PATCH, glm_image_processor
from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, bpe_tokenizer, image_only, seeded
from tiny_parts import tiny_family

SPECIALS = ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>")
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|image_pad|>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@tiny_family("video_llama_3", image_size=(64, 40))
def build(model_type: str):
    from transformers.video_processing_utils import BaseVideoProcessor

    tokenizer = bpe_tokenizer(bos=None, eos="<|im_end|>", pad="<|im_end|>", extra=SPECIALS)
    image_processor = glm_image_processor(transformers.VideoLlama3ImageProcessorPil)
    image_processor.temporal_patch_size = 1
    processor = image_only(transformers.VideoLlama3Processor)(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=BaseVideoProcessor(),
        chat_template=TEMPLATE,
    )
    vision = transformers.VideoLlama3VisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        patch_size=PATCH,
    )
    text = transformers.Qwen2Config(
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
    config = transformers.VideoLlama3Config(
        vision_config=vision,
        text_config=text,
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
    )
    assert image_processor.merge_size == MERGE  # the tower pools each 2 x 2 window: the harder layout to check
    return seeded(lambda: transformers.VideoLlama3ForConditionalGeneration(config)), processor
