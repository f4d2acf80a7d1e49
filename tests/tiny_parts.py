"""What every tiny test model is built from: shared sizes, a seeded build, a byte-level BPE
tokenizer with a family's special tokens, small text and vision configs, a test image.

``tiny_models`` builds the first eight families from these, ``tiny_families/`` one module per
family added since; tests import everything through ``tiny_models``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SEED = 0
"""Every tiny model is initialised from this torch seed, so test results are reproducible."""

# Sizes shared by all families: small enough to run a forward pass in milliseconds on a CPU.
HIDDEN = 32
INTERMEDIATE = 64
LAYERS = 2
HEADS = 2
HEAD_DIM = HIDDEN // HEADS
MAX_POSITIONS = 1024
VISION_IMAGE_SIZE = 32  # pixels per side of one vision-encoder input (tile)
BPE_VOCAB = 320

_CORPUS = (
    "what colour is the square in the picture",
    "the answer is red and the shape is a circle",
    "a blue triangle on the left of a green star",
    "how many objects are there? there are three objects",
    "is the door open or closed",
    "User Assistant USER ASSISTANT user assistant model",
)

def tiny_image(width: int, height: int, seed: int = SEED) -> Image.Image:
    """A deterministic RGB image with a coloured square, so pixel statistics are not flat."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = (220, 30, 30)
    return Image.fromarray(pixels, mode="RGB")


def bpe_tokenizer(
    *,
    bos: str | None,
    eos: str,
    pad: str,
    unk: str | None = None,
    extra: tuple[str, ...] = (),
    named: dict[str, str] | None = None,
    add_bos: bool = False,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences, with the family's special tokens.

    ``named`` tokens become attributes (``tokenizer.image_token``, ``tokenizer.image_token_id``),
    as processors such as Gemma 3's read them from the tokenizer.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(_CORPUS, trainer=trainer)
    specials = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{k: v for k, v in specials.items() if v is not None},
        extra_special_tokens=dict(named) if named else list(extra),
        add_bos_token=add_bos,
        add_eos_token=False,
    )
    if named and extra:
        tokenizer.add_tokens(list(extra), special_tokens=True)
    return tokenizer


def seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(SEED)
    model = build()
    return model.eval()


def llama_text(vocab: int, tokenizer: PreTrainedTokenizerFast):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def vision_kwargs(patch_size: int) -> dict:
    return {
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "image_size": VISION_IMAGE_SIZE,
        "patch_size": patch_size,
    }


def image_only(processor_cls: type) -> type:
    """``processor_cls`` accepting a bare video processor: the family's own needs torchvision.

    Without torchvision, transformers cannot even name the video processor base class, so the
    processor's argument check fails; images never touch the video half.
    """

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            return type(argument)
        return processor_cls.check_argument_for_proper_class(self, argument_name, argument)

    return type(
        f"{processor_cls.__name__}ImageOnly",
        (processor_cls,),
        {"check_argument_for_proper_class": check_argument_for_proper_class},
    )


@dataclass(frozen=True)
class TinyFamily:
    """How to build one family's tiny model: the builder and the test image that exercises it."""

    model_type: str
    build: Callable[[], tuple]
    image_size: tuple[int, int] = (64, 48)
    """(width, height) of its test image."""
    needs: str | None = None
    """A Python package its processor imports beyond the project's dependencies, if any."""


TINY_FAMILIES: dict[str, TinyFamily] = {}
"""Families added as modules of ``tests/tiny_families/``, registered by :func:`tiny_family`."""


def tiny_family(*model_types: str, image_size: tuple[int, int] = (64, 48), needs: str | None = None):
    """Decorator for a builder ``(model_type) -> (model, processor)`` serving ``model_types``."""

    def register(build: Callable[[str], tuple]) -> Callable[[str], tuple]:
        for model_type in model_types:
            if model_type in TINY_FAMILIES:
                raise ValueError(f"tiny family {model_type!r} registered twice")
            TINY_FAMILIES[model_type] = TinyFamily(model_type, lambda m=model_type: build(m), image_size, needs)
        return build

    return register


def thw_image_processor(image_processor_cls, patch: int, merge: int, **kwargs):
    """An ``image_grid_thw`` image processor (Qwen2-VL's and its heirs') at the tiny sizes: at most a
    32 x 32-pixel image's worth of patches, at least 2 x 2 merged tokens."""
    factor = patch * merge
    return image_processor_cls(
        patch_size=patch,
        merge_size=merge,
        size={"shortest_edge": 4 * factor * factor, "longest_edge": VISION_IMAGE_SIZE * VISION_IMAGE_SIZE * 4},
        **kwargs,
    )
