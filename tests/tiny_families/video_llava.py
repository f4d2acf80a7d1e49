"""Video-LLaVA: LLaVA-1.5's layout with an image tower of its own beside the video tower; its
image processor (CLIP-style resize and centre crop) names its output ``pixel_values_images``."""
from __future__ import annotations

from tiny_parts import HIDDEN, VISION_IMAGE_SIZE, bpe_tokenizer, image_only, llama_text, seeded, tiny_family, vision_kwargs

PATCH = 8


@tiny_family("video_llava", image_size=(40, 32))  # wide: the centre crop drops the sides
def build(model_type: str):
    from transformers import (
        CLIPVisionConfig,
        VideoLlavaConfig,
        VideoLlavaForConditionalGeneration,
        VideoLlavaImageProcessor,
        VideoLlavaProcessor,
    )
    from transformers.video_processing_utils import BaseVideoProcessor
    from xmllm.bench.scale_configs import LLAVA_TEMPLATE

    tokenizer = bpe_tokenizer(
        bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", extra=("<image>", "<video>"), add_bos=True
    )
    image_processor = VideoLlavaImageProcessor(
        size={"shortest_edge": VISION_IMAGE_SIZE},
        crop_size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE},
    )
    processor = image_only(VideoLlavaProcessor)(
        image_processor=image_processor,
        video_processor=BaseVideoProcessor(),
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token
        chat_template=LLAVA_TEMPLATE,
    )
    side = VISION_IMAGE_SIZE // PATCH
    config = VideoLlavaConfig(
        vision_config=CLIPVisionConfig(**vision_kwargs(PATCH), projection_dim=HIDDEN),
        text_config=llama_text(len(tokenizer), tokenizer),
        image_token_index=processor.image_token_id,
        video_token_index=processor.video_token_id,
        image_seq_length=side * side,
        video_seq_length=8 * side * side,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return seeded(lambda: VideoLlavaForConditionalGeneration(config)), processor
