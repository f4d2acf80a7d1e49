"""GLM-4.5V (glm4v_moe): GLM-4.1V's processor, vision tower and ``image_grid_thw`` in front of a
mixture-of-experts decoder (shared expert, routed experts after the first dense block)."""
from __future__ import annotations

import transformers
from tiny_families.glm4v import glm_ids, glm_processor, glm_text, glm_vision
from tiny_parts import INTERMEDIATE, seeded, tiny_family


@tiny_family("glm4v_moe", image_size=(64, 40))
def build(model_type: str):
    processor = glm_processor(transformers.Glm4vProcessor, transformers.Glm4vImageProcessorPil)
    tokenizer = processor.tokenizer
    text = glm_text(transformers.Glm4vMoeTextConfig, tokenizer, moe_intermediate_size=INTERMEDIATE // 2,
                    n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1)
    config = transformers.Glm4vMoeConfig(vision_config=glm_vision(transformers.Glm4vMoeVisionConfig), text_config=text,
                                         **glm_ids(tokenizer))
    return seeded(lambda: transformers.Glm4vMoeForConditionalGeneration(config)), processor
