"""Gemma 4: its image processor resizes each image (aspect ratio kept) to a multiple of
``pooling_kernel_size x patch_size`` and sends its patches row-major, padded to a fixed count, with
their (x, y) positions; the vision tower pools each ``k x k`` block of patches into one soft token
(row-major) between ``<start_of_image>`` and ``<end_of_image>``; a Gemma 4 decoder with per-layer
embeddings and a final logit soft cap. Audio and video parts are not built (the audio config is
optional, the video processor needs torchvision)."""
from __future__ import annotations

import transformers
from tiny_parts import HEAD_DIM, HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, bpe_tokenizer, image_only
from tiny_parts import seeded, tiny_family

PATCH = 4
POOL = 3
SOFT_TOKENS = 70  # the smallest budget the image processor takes: at most 70 x 9 patches an image
NAMED = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
         # its processor checks the audio tokens exist even for images (a real Gemma 4 tokenizer has them)
         "audio_token": "<audio_soft_token>", "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>"}
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image_soft_token>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@tiny_family("gemma4", image_size=(64, 40))
def build(model_type: str):
    from transformers.video_processing_utils import BaseVideoProcessor

    tokenizer = bpe_tokenizer(bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", named=NAMED,
                              extra=("<start_of_turn>", "<end_of_turn>"), add_bos=True)  # fmt: skip
    image_processor = transformers.Gemma4ImageProcessorPil(
        patch_size=PATCH, pooling_kernel_size=POOL, max_soft_tokens=SOFT_TOKENS
    )
    processor = image_only(transformers.Gemma4Processor)(
        feature_extractor=transformers.Gemma4AudioFeatureExtractor(), image_processor=image_processor,
        tokenizer=tokenizer, video_processor=BaseVideoProcessor(), chat_template=TEMPLATE,
        image_seq_length=SOFT_TOKENS,
    )  # fmt: skip
    tokenizer = processor.tokenizer  # the processor adds <|video|>
    vision = transformers.Gemma4VisionConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, head_dim=HEAD_DIM, patch_size=PATCH, pooling_kernel_size=POOL,
        position_embedding_size=64,
    )  # fmt: skip
    text = transformers.Gemma4TextConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=1, head_dim=HEAD_DIM, global_head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS, sliding_window=MAX_POSITIONS // 2,
        layer_types=["sliding_attention", "full_attention"][-LAYERS:], vocab_size_per_layer_input=len(tokenizer),
        hidden_size_per_layer_input=HIDDEN // 4, final_logit_softcapping=30.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    config = transformers.Gemma4Config(
        text_config=text, vision_config=vision, audio_config=None,
        image_token_id=tokenizer.image_token_id, boi_token_id=tokenizer.boi_token_id,
        eoi_token_id=tokenizer.eoi_token_id, video_token_id=processor.video_token_id,
    )  # fmt: skip
    return seeded(lambda: transformers.Gemma4ForConditionalGeneration(config)), processor
