"""GLM-GA (glmga): GLM-4.6V's model and processor behind a config of its own, with an image processor
that can round its sizes to a multiple of an expanded merge window (``patch_expand_factor``)."""
from __future__ import annotations

import transformers
from tiny_families.glm4v import glm_ids, glm_processor, glm_text, glm_vision
from tiny_parts import seeded, tiny_family


@tiny_family("glmga", image_size=(64, 40))
def build(model_type: str):
    processor = glm_processor(transformers.Glm46VProcessor, transformers.GlmgaImageProcessorPil)
    tokenizer = processor.tokenizer
    config = transformers.GlmgaConfig(vision_config=glm_vision(transformers.Glm4vVisionConfig),
                                      text_config=glm_text(transformers.Glm4vTextConfig, tokenizer),
                                      **glm_ids(tokenizer))
    return seeded(lambda: transformers.Glm46VForConditionalGeneration(config)), processor
