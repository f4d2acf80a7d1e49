"""The models benchmarks run on: the embedded demo model and a larger random LLaVA-shaped one.

The large one has LLaVA-1.5's shape where cost scales (CLIP-L/14 at 336 px: a 24x24 grid of
576 image tokens, a few hundred prompt tokens, 32 answer tokens) with narrow layers, so that
it fits a CPU; its numbers are read off its own processor and config, never assumed.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xmllm.explainers.answering import Answer
from xmllm.explainers.prepared import ExplainSample, Prepared, prepare

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.models import LoadedModel

    from . import BenchContext


def build_llava_576(folder: Path, seed: int = 0) -> Path:
    """Save a random LLaVA with a 336 px / 14 px-patch vision tower (576 tokens) to ``folder``."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from xmllm.explainers.demo.model import CHAT_TEMPLATE, build_tokenizer

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
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent)
    try:
        model.save_pretrained(scratch)
        processor.save_pretrained(scratch)
        os.replace(scratch, folder)  # whole or not at all: a half-written folder never passes as built
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


LONG_QUESTION = " ".join(["Is the red circle left of the blue square , and what colour is the triangle ?"] * 20)
"""About 300 prompt tokens of in-vocabulary words for the large model."""
ANSWER_TOKENS = 32
"""Answer length on the large model: generation is forced to this many tokens."""
QUICK_ANSWER_TOKENS = 8
"""Answer length on the large model under ``--quick`` (the full run uses ANSWER_TOKENS)."""
ANSWER_WORDS = "the red circle is left of the blue square and the green triangle is above it"
"""In-vocabulary words the large model's forced answer is cut from (its weights are random)."""
SAMPLE_SEED = 0
"""Every case explains the demo world's sample (SAMPLE_SEED, 0) on the chosen model and its image
with LONG_QUESTION on the large one."""

LARGE = "llava-576"
"""Label of the large model in ``BenchContext.models``."""
MAIN = "demo"
"""Label of the model chosen with ``--model`` (the demo model by default)."""


def answer_tokens(ctx: BenchContext) -> int:
    """How many answer tokens the large model's forced answer has in this run."""
    return QUICK_ANSWER_TOKENS if ctx.quick else ANSWER_TOKENS


def demo_sample() -> ExplainSample:
    """The demo world's bench sample with its ground truth (objects, mask, pair) for explainers."""
    from xmllm.explainers.demo.samples import generate_sample, to_explain_sample

    return to_explain_sample(generate_sample(SAMPLE_SEED, 0))


def own_prepared(loaded: LoadedModel) -> Prepared:
    """The bench sample with the model's own greedy answer."""
    return prepare(loaded, demo_sample())


def forced_prepared(loaded: LoadedModel, question: str, tokens: int) -> Prepared:
    """The bench image and ``question`` with an answer of exactly ``tokens`` word tokens: a random
    model's own answer could stop early or emit special tokens, and the cost does not depend on
    which words the answer has."""
    text = " ".join([ANSWER_WORDS] * (tokens // len(ANSWER_WORDS.split()) + 1))
    ids = loaded.adapter.tokenize_answer(text)[:tokens]
    tokenizer = loaded.processor.tokenizer
    answer = Answer(tokenizer.decode(ids), tuple(ids), tuple(tokenizer.convert_ids_to_tokens(ids)),
                    tuple(0.0 for _ in ids))
    return prepare(loaded, ExplainSample(demo_sample().images, question), answer=answer)


def prompt_inputs(loaded: LoadedModel, images: list[Any], question: str) -> Any:
    """The prompt's model inputs on the model's device (pixels in its dtype), as ``generate`` takes them."""
    inputs, _ = loaded.adapter.build_inputs(list(images), question)
    inputs = inputs.to(loaded.device)
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    return inputs


def load_large(folder: Path, device: str = "auto") -> LoadedModel:
    """Build (if needed) and load the large model with eager attention, as the attention explainers need."""
    from xmllm.explainers.models import load_model

    return load_model(build_llava_576(folder), device=device, eager_attention=True)
