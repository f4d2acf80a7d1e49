"""ShieldGemma 2: Gemma 3's model class (pooled SigLIP soft tokens between ``<start_of_image>`` and
``<end_of_image>``) under its own config, with a processor that writes the prompt itself: one row
per safety policy, each asking whether the image violates it. xmllm asks the question as the one
policy to classify against."""
from __future__ import annotations

import torch
import transformers
from tiny_parts import HEAD_DIM, HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, VISION_IMAGE_SIZE
from tiny_parts import bpe_tokenizer, seeded, tiny_family, vision_kwargs

PATCH = 4
POOLED_SIDE = 4
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>user\n"
    "You are a policy expert deciding whether an image violates the safety policy below.\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<start_of_image>\n"
    "{% elif c['type'] == 'text' %}Our safety policy is defined below:\n* {{ c['text'] }}\n{% endif %}{% endfor %}"
    "Does the image violate the above policy? Your answer must start with 'Yes' or 'No'.<end_of_turn>\n"
    "{% endfor %}<start_of_turn>model\n"
)


@tiny_family("shieldgemma2", image_size=(48, 40))
def build(model_type: str):
    tokenizer = bpe_tokenizer(
        bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>",
        named={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
        extra=("<start_of_turn>", "<end_of_turn>"), add_bos=True,
    )  # fmt: skip
    image_processor = transformers.Gemma3ImageProcessorPil(size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE})
    processor = transformers.ShieldGemma2Processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=TEMPLATE,
        image_seq_length=POOLED_SIDE * POOLED_SIDE, policy_definitions={},
    )  # fmt: skip
    text = transformers.Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=1, head_dim=HEAD_DIM, max_position_embeddings=MAX_POSITIONS,
        sliding_window=MAX_POSITIONS // 2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    config = transformers.ShieldGemma2Config(
        vision_config=transformers.SiglipVisionConfig(**vision_kwargs(PATCH), vision_use_head=False),
        text_config=text,
        mm_tokens_per_image=POOLED_SIDE * POOLED_SIDE,
        image_token_index=tokenizer.image_token_id,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
    )

    def build_model() -> torch.nn.Module:
        model = transformers.Gemma3ForConditionalGeneration(config)
        # the projector's matrix starts at zeros, as Gemma 3's does (tests/tiny_models.py): pixels would not matter
        with torch.no_grad():
            weight = model.model.multi_modal_projector.mm_input_projection_weight
            weight.normal_(0.0, weight.shape[0] ** -0.5)
        return model

    return seeded(build_model), processor
