"""VipLlava: LLaVA-1.5's processor and layout, features from several CLIP layers concatenated
(class token dropped) through a layer-normed projector."""
from __future__ import annotations

from tiny_parts import HIDDEN, LAYERS, VISION_IMAGE_SIZE, bpe_tokenizer, llama_text, seeded, tiny_family, vision_kwargs

PATCH = 8


@tiny_family("vipllava", image_size=(40, 32))
def build(model_type: str):
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaProcessor,
        VipLlavaConfig,
        VipLlavaForConditionalGeneration,
    )
    from xmllm.bench.scale_configs import LLAVA_TEMPLATE

    tokenizer = bpe_tokenizer(bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", extra=("<image>",), add_bos=True)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": VISION_IMAGE_SIZE},
        crop_size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",  # VipLlava drops the class token of every layer
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    config = VipLlavaConfig(
        vision_config=CLIPVisionConfig(**vision_kwargs(PATCH), projection_dim=HIDDEN),
        text_config=llama_text(len(tokenizer), tokenizer),
        image_token_index=processor.image_token_id,
        image_seq_length=(VISION_IMAGE_SIZE // PATCH) ** 2,
        vision_feature_layer=[-2, -1, 0][: LAYERS + 1],  # the last, the one before and the embeddings
    )
    return seeded(lambda: VipLlavaForConditionalGeneration(config)), processor
