"""dots3-note (preview): Qwen2-VL's image processor and ``image_grid_thw``; a vision tower whose
MLPs are dense or mixture-of-experts by layer, with an adapter merging each ``2 x 2`` window; a
decoder of multi-head latent attention (indexed and sliding-window layers) with shared and routed
experts; an audio tower (Whisper-style features) that images never touch."""
from __future__ import annotations

import transformers
from tiny_parts import HEAD_DIM, HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, bpe_tokenizer, image_only
from tiny_parts import seeded, tiny_family

SPECIALS = ("<|im_start|>", "<|im_end|>", "<|img|>", "<|endofimg|>", "<|imgpad|>", "<|video_pad|>",
            "<|audio_comp_pad|>")  # fmt: skip
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|img|><|imgpad|><|endofimg|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
EXPERTS = 4
HALF = HEAD_DIM // 2


@tiny_family("dots3_note", image_size=(64, 40))
def build(model_type: str):
    from tiny_models import _QWEN_MERGE, _QWEN_PATCH
    from transformers.video_processing_utils import BaseVideoProcessor

    tokenizer = bpe_tokenizer(bos=None, eos="<|im_end|>", pad="<|im_end|>", extra=SPECIALS)
    factor = _QWEN_PATCH * _QWEN_MERGE
    image_processor = transformers.Qwen2VLImageProcessorPil(
        patch_size=_QWEN_PATCH, merge_size=_QWEN_MERGE, temporal_patch_size=1,
        min_pixels=4 * factor * factor, max_pixels=32 * 32 * 4,
    )  # fmt: skip
    processor = image_only(transformers.Dots3NoteProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=BaseVideoProcessor(),
        feature_extractor=transformers.Dots3NoteFeatureExtractor(), chat_template=TEMPLATE,
    )  # fmt: skip
    vision = transformers.Dots3NoteVisionConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        patch_size=_QWEN_PATCH, spatial_merge_size=_QWEN_MERGE, adapter_merge_size=_QWEN_MERGE,
        moe_intermediate_size=INTERMEDIATE // 2, pyramid_num_routed=[-1, EXPERTS][:LAYERS], num_experts_per_tok=2,
        adapter_in_dim=HIDDEN, adapter_out_dim=HIDDEN,
    )  # fmt: skip
    audio = transformers.Dots3NoteAudioConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=1, num_attention_heads=HEADS,
        feature_size=16, downsample_hidden_size=16, adapter_input_size=HIDDEN, adapter_out_dim=HIDDEN,
    )  # fmt: skip
    text = transformers.Dots3NoteTextConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, head_dim=HEAD_DIM, q_lora_rank=HIDDEN // 2,
        kv_lora_rank=HIDDEN // 2, qk_nope_head_dim=HALF, qk_rope_head_dim=HALF, v_head_dim=HEAD_DIM,
        n_routed_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=INTERMEDIATE // 2,
        shared_experts_intermediate_size=INTERMEDIATE // 2, index_head_dim=HEAD_DIM, index_n_heads=HEADS,
        index_topk=MAX_POSITIONS, layer_types=["indexed_attention", "sliding_attention"][:LAYERS],
        mlp_layer_types=["dense", "sparse"][:LAYERS], sliding_window=MAX_POSITIONS // 2,
        swa_num_attention_heads=HEADS, swa_num_key_value_heads=HEADS, swa_q_lora_rank=HIDDEN // 2,
        swa_kv_lora_rank=HIDDEN // 2, swa_head_dim=HEAD_DIM, swa_qk_nope_head_dim=HALF, swa_v_head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    config = transformers.Dots3NoteConfig(
        text_config=text, vision_config=vision, audio_config=audio,
        image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
        audio_token_id=processor.audio_token_id,
    )  # fmt: skip
    return seeded(lambda: transformers.Dots3NoteForConditionalGeneration(config)), processor
