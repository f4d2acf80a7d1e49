"""DeepSeek-VL and DeepSeek-VL hybrid: Janus's padded-square SigLIP input, an MLP aligner and a Llama
decoder; the hybrid adds a high-resolution SAM tower (its own padded square, ``high_res_pixel_values``)
whose convolved features join the SigLIP ones token by token."""
from __future__ import annotations

import transformers
from tiny_families.janus import PATCH
from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, VISION_IMAGE_SIZE, bpe_tokenizer, llama_text, seeded
from tiny_parts import tiny_family, vision_kwargs

TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ 'User: ' if message['role'] == 'user' else 'Assistant: ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image_placeholder>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
HIGH_RES = 2 * VISION_IMAGE_SIZE  # the SAM tower's square side: twice the SigLIP one, as 1024 to 384 roughly
SAM_PATCH = 4


@tiny_family("deepseek_vl", "deepseek_vl_hybrid", image_size=(64, 40))
def build(model_type: str):
    hybrid = model_type == "deepseek_vl_hybrid"
    tokenizer = bpe_tokenizer(bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
                              named={"image_token": "<image_placeholder>"}, add_bos=True)  # fmt: skip
    square = {"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE}
    if hybrid:
        image_processor = transformers.DeepseekVLHybridImageProcessorPil(
            size=square, high_res_size={"height": HIGH_RES, "width": HIGH_RES}, min_size=PATCH
        )
        processor_cls, config_cls, model_cls = (transformers.DeepseekVLHybridProcessor, transformers.DeepseekVLHybridConfig,
                                                transformers.DeepseekVLHybridForConditionalGeneration)  # fmt: skip
    else:
        image_processor = transformers.DeepseekVLImageProcessorPil(size=square, min_size=PATCH)
        processor_cls, config_cls, model_cls = (transformers.DeepseekVLProcessor, transformers.DeepseekVLConfig,
                                                transformers.DeepseekVLForConditionalGeneration)  # fmt: skip
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=TEMPLATE,
                              num_image_tokens=(VISION_IMAGE_SIZE // PATCH) ** 2)  # fmt: skip
    kwargs = dict(
        vision_config=transformers.SiglipVisionConfig(**vision_kwargs(PATCH)),
        text_config=llama_text(len(tokenizer), tokenizer),
        image_token_id=processor.image_token_id,
    )
    if hybrid:
        kwargs["high_res_vision_config"] = transformers.SamVisionConfig(
            hidden_size=HIDDEN, output_channels=HIDDEN // 4, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            image_size=HIGH_RES, patch_size=SAM_PATCH, window_size=4, global_attn_indexes=[LAYERS - 1],
            mlp_dim=INTERMEDIATE,
        )  # fmt: skip
    config = config_cls(**kwargs)
    return seeded(lambda: model_cls(config)), processor
