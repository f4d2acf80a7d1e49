"""Aria: an Idefics3 (SigLIP) vision tower on one padded square per image (or per crop with
``split_image``), a projector whose learned queries cross-attend over all of a view's patches (the
query count per patch count from ``projector_patch_to_query_dict``), and a mixture-of-experts decoder
with shared experts. The processor accepts only 490- or 980-pixel views: large patches keep the tiny
tower's sequence short."""
from __future__ import annotations

from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, bpe_tokenizer, seeded, tiny_family

VIEW = 490  # the smaller of the two view sizes the processor accepts
PATCH = 70  # 7 x 7 patches a view
QUERIES = 16  # image tokens per view
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<fim_prefix><|img|><fim_suffix>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@tiny_family("aria", image_size=(64, 40))
def build(model_type: str):
    import torch
    from transformers import AriaConfig, AriaForConditionalGeneration, AriaImageProcessorPil, AriaProcessor
    from transformers import AriaTextConfig, Idefics3VisionConfig

    tokenizer = bpe_tokenizer(
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named={"image_token": "<|img|>"},
        extra=("<|im_start|>", "<fim_prefix>", "<fim_suffix>"),
    )
    image_processor = AriaImageProcessorPil(max_image_size=VIEW, min_image_size=PATCH)
    processor = AriaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=TEMPLATE,
        size_conversion={VIEW: QUERIES},
    )
    processor.images_kwargs = {"max_image_size": VIEW, "split_image": False}
    vision = Idefics3VisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=VIEW,
        patch_size=PATCH,
    )
    text = AriaTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        moe_num_experts=4,
        moe_topk=2,
        moe_num_shared_experts=1,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = AriaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        projector_patch_to_query_dict={(VIEW // PATCH) ** 2: QUERIES},
    )

    def make():
        model = AriaForConditionalGeneration(config)
        torch.nn.init.normal_(model.model.multi_modal_projector.query, std=0.02)  # zeros: every query alike
        return model

    return seeded(make), processor
