"""LLaVA-NeXT-Video: LLaVA-NeXT's any-res image path (base view, unpadded tiles, image_newline)
beside a pooled video path; images are laid out as LLaVA-NeXT's."""
from __future__ import annotations

from tiny_parts import HIDDEN, VISION_IMAGE_SIZE, bpe_tokenizer, image_only, llama_text, seeded, tiny_family, vision_kwargs

PATCH = 8
PINPOINTS = [[VISION_IMAGE_SIZE, 2 * VISION_IMAGE_SIZE], [2 * VISION_IMAGE_SIZE, VISION_IMAGE_SIZE],
             [2 * VISION_IMAGE_SIZE, 2 * VISION_IMAGE_SIZE]]  # fmt: skip


@tiny_family("llava_next_video", image_size=(56, 40))  # wide: 2 x 2 tiles, unpadded rows
def build(model_type: str):
    from transformers import (
        CLIPVisionConfig,
        LlavaNextImageProcessorPil,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoProcessor,
    )
    from transformers.video_processing_utils import BaseVideoProcessor
    from xmllm.bench.scale_configs import LLAVA_TEMPLATE

    tokenizer = bpe_tokenizer(
        bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", extra=("<image>", "<video>"), add_bos=True
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": VISION_IMAGE_SIZE},
        crop_size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE},
        image_grid_pinpoints=PINPOINTS,
    )
    processor = image_only(LlavaNextVideoProcessor)(
        video_processor=BaseVideoProcessor(),
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token
        chat_template=LLAVA_TEMPLATE,
    )
    config = LlavaNextVideoConfig(
        vision_config=CLIPVisionConfig(**vision_kwargs(PATCH), projection_dim=HIDDEN),
        text_config=llama_text(len(tokenizer), tokenizer),
        image_token_index=processor.image_token_id,
        video_token_index=processor.video_token_id,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return seeded(lambda: LlavaNextVideoForConditionalGeneration(config)), processor
