"""GLM-OCR (glm_ocr): GLM-4.1V's ``image_grid_thw`` patches through GLM-4.6V's processor (the one
its checkpoint names), a GLM-4.1V-like vision tower with RMS-normed attention, a GLM decoder."""
from __future__ import annotations

import transformers
from tiny_families.glm4v import glm_ids, glm_processor, glm_text, glm_vision
from tiny_parts import seeded, tiny_family


@tiny_family("glm_ocr", image_size=(64, 40))
def build(model_type: str):
    processor = glm_processor(transformers.Glm46VProcessor, transformers.Glm46VImageProcessorPil)
    tokenizer = processor.tokenizer
    config = transformers.GlmOcrConfig(vision_config=glm_vision(transformers.GlmOcrVisionConfig),
                                       text_config=glm_text(transformers.GlmOcrTextConfig, tokenizer),
                                       **glm_ids(tokenizer))
    return seeded(lambda: transformers.GlmOcrForConditionalGeneration(config)), processor
