"""HY V4 VL (Hy4): HunYuan-VL's tower (raster-order patches, a kernel-equals-stride merger, a
learned newline feature ending each merged row, no begin/end features) on Qwen2-VL's processor, a
DeepSeek-V4-style decoder: MLA with a sparse top-k indexer and attention sinks, hyper-connections
(``hc_mult`` residual streams), a dense first MLP then mixture-of-experts MLPs."""
from __future__ import annotations

import transformers
from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, VISION_IMAGE_SIZE, bpe_tokenizer, image_only
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


@tiny_family("hy_v4_vl", image_size=(64, 40))
def build(model_type: str):
    from transformers.video_processing_utils import BaseVideoProcessor

    tokenizer = bpe_tokenizer(bos=None, eos="<|im_end|>", pad="<|endoftext|>", extra=SPECIALS)
    image_processor = thw_image_processor(transformers.HYV4VLImageProcessorPil, PATCH, MERGE)
    processor = image_only(transformers.HYV4VLProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=BaseVideoProcessor(),
        chat_template=TEMPLATE,
    )
    vision = transformers.HYV4VLVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        out_hidden_size=HIDDEN,
        max_image_size=VISION_IMAGE_SIZE,
    )
    rope_dim = 8
    text = transformers.HYV4VLTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        moe_intermediate_size=INTERMEDIATE // 2,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        q_lora_rank=HIDDEN // 2,
        kv_lora_rank=HIDDEN // 2,
        qk_nope_head_dim=HIDDEN // HEADS - rope_dim,
        qk_rope_head_dim=rope_dim,
        v_head_dim=HIDDEN // HEADS,
        n_routed_experts=4,
        num_experts_per_tok=2,
        index_head_dim=8,
        index_n_heads=HEADS,
        hc_mult=2,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"))}  # fmt: skip
    config = transformers.HYV4VLConfig(vision_config=vision, text_config=text, **ids)
    return seeded(lambda: transformers.HYV4VLForConditionalGeneration(config)), processor
