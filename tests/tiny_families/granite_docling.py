"""Granite Docling: Idefics3's tiling and tile tags (an unsplit image is one ``<row_1_col_1>`` tile,
no global view), a SigLIP-style tower whose connector pixel-shuffles each tile (coarse, or on the
fine route half the factor) and feeds DeepStack features into the first decoder blocks; a Granite
decoder with muP multipliers (its logits divided by ``logits_scaling``)."""
from __future__ import annotations

import transformers
from tiny_parts import HIDDEN, LAYERS, VISION_IMAGE_SIZE, bpe_tokenizer, seeded, tiny_family, vision_kwargs

from xmllm.bench.scale_configs import IDEFICS3_TEMPLATE

PATCH = 2
SCALE = 4  # 16 x 16 patches a tile: 4 x 4 tokens on the coarse route, 8 x 8 on the fine one


@tiny_family("granite_docling", image_size=(90, 60))
def build(model_type: str):
    from tiny_models import _IDEFICS_SPECIALS, HEADS, INTERMEDIATE, MAX_POSITIONS

    tokenizer = bpe_tokenizer(bos="<|im_start|>", eos="<end_of_utterance>", pad="<|endoftext|>",
                              extra=_IDEFICS_SPECIALS)  # fmt: skip
    image_processor = transformers.GraniteDoclingImageProcessorPil(
        size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE}, max_patches=6
    )
    per_tile = (VISION_IMAGE_SIZE // PATCH // SCALE) ** 2
    processor = transformers.GraniteDoclingProcessor(image_processor, tokenizer, image_seq_len=per_tile,
                                                     chat_template=IDEFICS3_TEMPLATE)  # fmt: skip
    vision = transformers.GraniteDoclingVisionConfig(
        **vision_kwargs(PATCH), out_hidden_size=HIDDEN, scale_factor=SCALE, deepstack_visual_indexes=[0]
    )
    text = transformers.GraniteDoclingTextConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    config = transformers.GraniteDoclingConfig(
        vision_config=vision, text_config=text, image_token_id=processor.image_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return seeded(lambda: transformers.GraniteDoclingForConditionalGeneration(config)), processor
