"""DeepSeek-OCR 2: each view (a padded global square, and local tiles when ``crop_to_patches``)
through a SAM encoder and two stride-2 convolutions, then a Qwen2-style encoder in which learned
queries (144 or 256, by the view's patch count) read the patches; the queries are the view's image
tokens, a learned separator ends each image; a DeepSeek-V2-style decoder with dense then MoE MLPs.
The view size is the one whose query count the processor's ``patch_size`` and ``downsample_ratio``
make 144 (12 x 12), as the checkpoint's 768-pixel tiles do; local tiles are off to keep it short."""
from __future__ import annotations

from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, bpe_tokenizer, seeded, tiny_family

PATCH = 4
DOWNSAMPLE = 4  # two stride-2 convolutions
QUERY_SIDE = 12  # the model's smaller query table holds 144 = 12 x 12 queries
VIEW = QUERY_SIDE * PATCH * DOWNSAMPLE
TEMPLATE = (
    "{% for message in messages %}<|User|>"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>{% endif %}"
)


@tiny_family("deepseek_ocr2", image_size=(64, 40))
def build(model_type: str):
    from transformers import (
        DeepseekOcr2Config,
        DeepseekOcr2ForConditionalGeneration,
        DeepseekOcr2ImageProcessorPil,
        DeepseekOcr2Processor,
    )
    from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import (
        DeepseekOcr2SamVisionConfig,
        DeepseekOcr2TextConfig,
        DeepseekOcr2VisionConfig,
        DeepseekOcr2VisionEncoderConfig,
    )

    tokenizer = bpe_tokenizer(
        bos=None, eos="<｜end▁of▁sentence｜>", pad="<pad>", extra=("<|User|>", "<|Assistant|>", "<image>")
    )
    image_processor = DeepseekOcr2ImageProcessorPil(
        size={"height": VIEW, "width": VIEW}, tile_size=VIEW, crop_to_patches=False
    )
    processor = DeepseekOcr2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=TEMPLATE,
        patch_size=PATCH,
        downsample_ratio=DOWNSAMPLE,
    )
    processor.images_kwargs = {"crop_to_patches": False}
    sam = DeepseekOcr2SamVisionConfig(
        hidden_size=HIDDEN,
        output_channels=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=VIEW,
        patch_size=PATCH,
        window_size=8,
        global_attn_indexes=[LAYERS - 1],
        mlp_dim=INTERMEDIATE,
        downsample_channels=[HIDDEN, HIDDEN],
        initializer_range=0.02,  # the config's 1e-10 leaves a random tower blind to its pixels
    )
    encoder = DeepseekOcr2VisionEncoderConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
    )
    text = DeepseekOcr2TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=INTERMEDIATE // 2,
        mlp_layer_types=["dense", "sparse"][:LAYERS],
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = DeepseekOcr2Config(
        vision_config=DeepseekOcr2VisionConfig(sam_config=sam, encoder_config=encoder),
        text_config=text,
        image_token_id=processor.image_token_id,
    )
    return seeded(lambda: DeepseekOcr2ForConditionalGeneration(config)), processor
