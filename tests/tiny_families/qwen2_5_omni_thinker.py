"""Qwen2.5-Omni's thinker (qwen2_5_omni_thinker): the omni model's text-generating half, with
Qwen2.5-VL's windowed vision tower and ``image_grid_thw`` (through Qwen2.5-Omni's processor, its
image between ``<|vision_bos|>`` and ``<|vision_eos|>``) and an audio tower the image never touches."""
from __future__ import annotations

import transformers
from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, VISION_IMAGE_SIZE, bpe_tokenizer, image_only
from tiny_parts import seeded, tiny_family

PATCH = 4
MERGE = 2
TEMPORAL = 2
MEL_BINS = 16
NAMED = {"image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
         "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
         "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}  # fmt: skip
"""Qwen2.5-Omni's names for its special tokens (the processor reads them off the tokenizer)."""


def omni_template(named: dict[str, str]) -> str:
    """Qwen's chat turns, each image as ``vision_bos image vision_eos``."""
    image = named["vision_bos_token"] + named["image_token"] + named["vision_eos_token"]
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}" + image + ""
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def omni_processor(processor_cls, named: dict[str, str]):
    """``processor_cls`` (an omni processor) at the tiny sizes, with a small Whisper feature extractor."""
    from transformers.video_processing_utils import BaseVideoProcessor

    tokenizer = bpe_tokenizer(bos=None, eos="<|im_end|>", pad="<|endoftext|>", named=named,
                              extra=("<|im_start|>", "<|im_end|>", "<|endoftext|>"))  # fmt: skip
    factor = PATCH * MERGE
    image_processor = transformers.Qwen2VLImageProcessorPil(
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        min_pixels=4 * factor * factor,
        max_pixels=VISION_IMAGE_SIZE * VISION_IMAGE_SIZE * 4,
    )
    return image_only(processor_cls)(
        image_processor=image_processor,
        video_processor=BaseVideoProcessor(),
        feature_extractor=transformers.WhisperFeatureExtractor(feature_size=MEL_BINS),
        tokenizer=tokenizer,
        chat_template=omni_template(named),
    )


def audio_kwargs() -> dict:
    return dict(num_mel_bins=MEL_BINS, encoder_layers=1, encoder_attention_heads=HEADS, encoder_ffn_dim=INTERMEDIATE,
                d_model=HIDDEN, output_dim=HIDDEN, max_source_positions=64, n_window=4)  # fmt: skip


def text_kwargs(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@tiny_family("qwen2_5_omni_thinker", image_size=(64, 40))
def build(model_type: str):
    processor = omni_processor(transformers.Qwen2_5OmniProcessor, NAMED)
    tokenizer = processor.tokenizer
    sub = transformers.Qwen2_5OmniThinkerConfig.sub_configs
    vision = sub["vision_config"](
        depth=LAYERS,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        out_hidden_size=HIDDEN,
        num_heads=HEADS,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        window_size=2 * PATCH * MERGE,
        fullatt_block_indexes=[LAYERS - 1],
    )
    config = transformers.Qwen2_5OmniThinkerConfig(
        audio_config=sub["audio_config"](**audio_kwargs()),
        vision_config=vision,
        text_config=sub["text_config"](**text_kwargs(tokenizer)),
        image_token_index=processor.image_token_id,
        video_token_index=processor.video_token_id,
        audio_token_index=processor.audio_token_id,
        audio_start_token_id=tokenizer.convert_tokens_to_ids(NAMED["audio_bos_token"]),
        audio_end_token_id=tokenizer.convert_tokens_to_ids(NAMED["audio_eos_token"]),
        user_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        # the checkpoint's config carries these too: its rope index finds each image by them
        vision_start_token_id=tokenizer.convert_tokens_to_ids(NAMED["vision_bos_token"]),
        vision_end_token_id=tokenizer.convert_tokens_to_ids(NAMED["vision_eos_token"]),
    )
    return seeded(lambda: transformers.Qwen2_5OmniThinkerForConditionalGeneration(config)), processor
