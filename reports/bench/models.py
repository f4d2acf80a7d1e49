"""The models benchmarks run on: the embedded demo model and a larger random LLaVA-shaped one.

The large one has LLaVA-1.5's shape where cost scales (CLIP-L/14 at 336 px: a 24x24 grid of
576 image tokens, a few hundred prompt tokens, 32 answer tokens) with narrow layers, so that
it fits a CPU; its numbers are read off its own processor and config, never assumed.
"""
from __future__ import annotations

from pathlib import Path


def build_llava_576(folder: Path, seed: int = 0) -> Path:
    """Save a random LLaVA with a 336 px / 14 px-patch vision tower (576 tokens) to ``folder``."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from explainers.demo.model import CHAT_TEMPLATE, build_tokenizer

    if (folder / "config.json").is_file():
        return folder
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 4096
    size, patch = 336, 14
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                       num_attention_heads=4, image_size=size, patch_size=patch, projection_dim=64),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4,
                                max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(size // patch) ** 2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


LONG_QUESTION = " ".join(["Is the red circle left of the blue square , and what colour is the triangle ?"] * 20)
"""About 300 prompt tokens of in-vocabulary words for the large model."""
ANSWER_TOKENS = 32
"""Answer length on the large model: generation is forced to this many tokens."""


LARGE = "llava-576"
"""Label of the large model in ``BenchContext.models``."""
QUICK_ANSWER_TOKENS = 8
"""Answer length on the large model under ``--quick`` (the full run uses ANSWER_TOKENS)."""
ANSWER_WORDS = "the red circle is left of the blue square and the green triangle is above it"
"""In-vocabulary words the large model's forced answer is cut from (its weights are random)."""


def large_model(ctx, scratch: str):
    """The large model from the context, or built into ``scratch`` and loaded with eager attention."""
    if LARGE in ctx.models:
        return ctx.models[LARGE]
    from explainers.models import load_model

    return load_model(build_llava_576(Path(scratch) / LARGE), eager_attention=True)
