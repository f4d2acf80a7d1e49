"""Tiny random image-text-to-text models with real processors, one per model family.

Built offline from the real config, image-processor and processor classes of each family, so
that adapters and explainers are tested on the same code paths as full-size checkpoints, in
milliseconds. The tokenizer is a byte-level BPE trained on a few sentences, with the special
tokens each processor expects; the chat templates are written here for families whose
processor has none built in.

Usage from tests: ``from tiny_models import build_tiny, tiny_image, TEST_IMAGE_SIZES``.
"""
from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable

import torch
from tiny_parts import (  # noqa: F401  (re-exported: tests import these from here)
    BPE_VOCAB,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    INTERMEDIATE,
    LAYERS,
    MAX_POSITIONS,
    SEED,
    VISION_IMAGE_SIZE,
    bpe_tokenizer,
    image_only,
    llama_text,
    TINY_FAMILIES,
    seeded,
    tiny_family,
    tiny_image,
    vision_kwargs,
)

from xmllm.bench.scale_configs import IDEFICS3_TEMPLATE, LLAVA_TEMPLATE, QWEN_TEMPLATE

FAMILIES: tuple[str, ...] = (
    "llava",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
    "idefics3",
    "smolvlm",
    "paligemma",
    "gemma3",
)

TEST_IMAGE_SIZES: dict[str, tuple[int, int]] = {
    "llava": (32, 32),
    "llava_next": (56, 40),  # wide: best pinpoint 64x64, 2x2 tiles, unpadded rows
    "qwen2_vl": (64, 40),  # non-square: a 5 x 8 merged grid
    "qwen2_5_vl": (64, 40),
    "idefics3": (90, 60),  # split into 2 rows x 3 cols of tiles plus the global image
    "smolvlm": (90, 60),
    "paligemma": (48, 40),
    "gemma3": (48, 40),
}
"""(width, height) of a test image per family, chosen to exercise tiling and aspect ratios."""


# --- chat templates (jinja) for the tiny processors -------------------------------------------

# LLaVA's, Qwen2-VL's and Idefics3's come from the scale bench (its real-width processors use them too)

PALIGEMMA_TEMPLATE = (
    "{% for message in messages %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endfor %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<start_of_image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# --- one builder per family --------------------------------------------------------------------


def _llava():
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    patch = 8
    tokenizer = bpe_tokenizer(bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", extra=("<image>",), add_bos=True)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": VISION_IMAGE_SIZE},
        crop_size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token
        chat_template=LLAVA_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision_kwargs(patch), projection_dim=HIDDEN),
        text_config=llama_text(len(tokenizer), tokenizer),
        image_token_id=processor.image_token_id,
        image_seq_length=(VISION_IMAGE_SIZE // patch) ** 2,
    )
    return seeded(lambda: LlavaForConditionalGeneration(config)), processor


def _llava_next():
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    patch = 8
    pinpoints = [[VISION_IMAGE_SIZE, 2 * VISION_IMAGE_SIZE], [2 * VISION_IMAGE_SIZE, VISION_IMAGE_SIZE],
                 [2 * VISION_IMAGE_SIZE, 2 * VISION_IMAGE_SIZE]]  # fmt: skip
    tokenizer = bpe_tokenizer(bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", extra=("<image>",), add_bos=True)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": VISION_IMAGE_SIZE},
        crop_size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision_kwargs(patch), projection_dim=HIDDEN),
        text_config=llama_text(len(tokenizer), tokenizer),
        image_token_id=processor.image_token_id,
        image_grid_pinpoints=pinpoints,
    )
    return seeded(lambda: LlavaNextForConditionalGeneration(config)), processor


_QWEN_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_QWEN_PATCH = 4
_QWEN_MERGE = 2
_QWEN_TEMPORAL = 2
_QWEN_MROPE_SECTION = [2, 3, 3]  # sums to HEAD_DIM // 2


def _qwen_processor(processor_cls):
    from transformers import Qwen2VLImageProcessorPil
    from transformers.video_processing_utils import BaseVideoProcessor

    tokenizer = bpe_tokenizer(bos=None, eos="<|endoftext|>", pad="<|endoftext|>", extra=_QWEN_SPECIALS)
    factor = _QWEN_PATCH * _QWEN_MERGE
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=_QWEN_PATCH,
        merge_size=_QWEN_MERGE,
        temporal_patch_size=_QWEN_TEMPORAL,
        min_pixels=4 * factor * factor,
        max_pixels=VISION_IMAGE_SIZE * VISION_IMAGE_SIZE * 4,
    )
    return image_only(processor_cls)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=BaseVideoProcessor(),
        chat_template=QWEN_TEMPLATE,
    )


def _qwen_ids(processor) -> dict:
    tok = processor.tokenizer
    return {
        "image_token_id": processor.image_token_id,
        "video_token_id": processor.video_token_id,
        "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
    }


def _qwen_text(config_cls, vocab: int, tokenizer) -> dict:
    return config_cls(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _QWEN_MROPE_SECTION},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _qwen2_vl():
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
        Qwen2VLTextConfig,
        Qwen2VLVisionConfig,
    )

    processor = _qwen_processor(Qwen2VLProcessor)
    vision = Qwen2VLVisionConfig(
        depth=LAYERS,
        embed_dim=HIDDEN,
        hidden_size=HIDDEN,
        mlp_ratio=2,
        num_heads=HEADS,
        patch_size=_QWEN_PATCH,
        spatial_merge_size=_QWEN_MERGE,
        temporal_patch_size=_QWEN_TEMPORAL,
    )
    config = Qwen2VLConfig(
        vision_config=vision,
        text_config=_qwen_text(Qwen2VLTextConfig, len(processor.tokenizer), processor.tokenizer),
        **_qwen_ids(processor),
    )
    return seeded(lambda: Qwen2VLForConditionalGeneration(config)), processor


def _qwen2_5_vl():
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2_5_VLTextConfig,
    )
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    processor = _qwen_processor(Qwen2_5_VLProcessor)
    vision = Qwen2_5_VLVisionConfig(
        depth=LAYERS,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        out_hidden_size=HIDDEN,
        num_heads=HEADS,
        patch_size=_QWEN_PATCH,
        spatial_merge_size=_QWEN_MERGE,
        temporal_patch_size=_QWEN_TEMPORAL,
        window_size=2 * _QWEN_PATCH * _QWEN_MERGE,  # windows of 2 x 2 merged tokens
        fullatt_block_indexes=[LAYERS - 1],
    )
    config = Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=_qwen_text(Qwen2_5_VLTextConfig, len(processor.tokenizer), processor.tokenizer),
        **_qwen_ids(processor),
    )
    return seeded(lambda: Qwen2_5_VLForConditionalGeneration(config)), processor


_IDEFICS_PATCH = 4
_IDEFICS_SCALE = 2
_IDEFICS_MAX_TILES_PER_SIDE = 6  # the processors name tiles <row_i_col_j> up to 6 x 6
_IDEFICS_SPECIALS = (
    "<|im_start|>",
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *(
        f"<row_{r}_col_{c}>"
        for r in range(1, _IDEFICS_MAX_TILES_PER_SIDE + 1)
        for c in range(1, _IDEFICS_MAX_TILES_PER_SIDE + 1)
    ),
)


def _idefics_like(config_cls, model_cls, processor_factory, image_processor_cls):
    """Idefics3 and SmolVLM share a layout: SigLIP-like tiles, pixel shuffle, a Llama decoder."""
    tokenizer = bpe_tokenizer(
        bos="<|im_start|>", eos="<end_of_utterance>", pad="<|endoftext|>", extra=_IDEFICS_SPECIALS
    )
    image_processor = image_processor_cls(
        size={"longest_edge": 3 * VISION_IMAGE_SIZE},
        max_image_size={"longest_edge": VISION_IMAGE_SIZE},
    )
    tile_side = VISION_IMAGE_SIZE // _IDEFICS_PATCH // _IDEFICS_SCALE
    processor = processor_factory(image_processor, tokenizer, tile_side * tile_side)
    vision_cls = config_cls.sub_configs["vision_config"]
    config = config_cls(
        vision_config=vision_cls(**vision_kwargs(_IDEFICS_PATCH)),
        text_config=llama_text(len(processor.tokenizer), processor.tokenizer).to_dict(),
        scale_factor=_IDEFICS_SCALE,
        image_token_id=processor.image_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    return seeded(lambda: model_cls(config)), processor


def _idefics3():
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    def factory(image_processor, tokenizer, seq_len):
        return Idefics3Processor(image_processor, tokenizer, image_seq_len=seq_len, chat_template=IDEFICS3_TEMPLATE)

    return _idefics_like(Idefics3Config, Idefics3ForConditionalGeneration, factory, Idefics3ImageProcessorPil)


def _smolvlm():
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil, SmolVLMProcessor
    from transformers.video_processing_utils import BaseVideoProcessor

    def factory(image_processor, tokenizer, seq_len):
        return image_only(SmolVLMProcessor)(
            image_processor,
            tokenizer,
            BaseVideoProcessor(),
            image_seq_len=seq_len,
            chat_template=IDEFICS3_TEMPLATE,
        )

    return _idefics_like(SmolVLMConfig, SmolVLMForConditionalGeneration, factory, SmolVLMImageProcessorPil)


def _paligemma():
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    patch = 4
    tokenizer = bpe_tokenizer(bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", add_bos=True)
    image_processor = SiglipImageProcessorPil(size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE})
    image_processor.image_seq_length = (VISION_IMAGE_SIZE // patch) ** 2
    processor = PaliGemmaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=PALIGEMMA_TEMPLATE
    )
    vocab = len(processor.tokenizer)  # the processor adds <image> and the location/segmentation tokens
    text = GemmaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=1,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**vision_kwargs(patch)),
        text_config=text,
        image_token_id=processor.image_token_id,
        vocab_size=vocab,
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
    )
    return seeded(lambda: PaliGemmaForConditionalGeneration(config)), processor


def _gemma3():
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    patch = 4
    pooled_side = 4  # the projector average-pools the 8 x 8 patch grid to 4 x 4 tokens
    tokenizer = bpe_tokenizer(
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        named={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
        extra=("<start_of_turn>", "<end_of_turn>"),
        add_bos=True,
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE})
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_TEMPLATE,
        image_seq_length=pooled_side * pooled_side,
    )
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=1,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        sliding_window=MAX_POSITIONS // 2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Gemma3Config(
        vision_config=SiglipVisionConfig(**vision_kwargs(patch), vision_use_head=False),
        text_config=text,
        mm_tokens_per_image=pooled_side * pooled_side,
        image_token_id=tokenizer.image_token_id,
        boi_token_id=tokenizer.boi_token_id,
        eoi_token_id=tokenizer.eoi_token_id,
    )

    def build() -> torch.nn.Module:
        model = Gemma3ForConditionalGeneration(config)
        # transformers initialises the projector's matrix to zeros: every image would reach the
        # decoder as the same all-zero features, and no pixel could change an answer
        with torch.no_grad():
            weight = model.model.multi_modal_projector.mm_input_projection_weight
            weight.normal_(0.0, weight.shape[0] ** -0.5)
        return model

    return seeded(build), processor


_BUILDERS: dict[str, Callable[[], tuple]] = {
    "llava": _llava,
    "llava_next": _llava_next,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "idefics3": _idefics3,
    "smolvlm": _smolvlm,
    "paligemma": _paligemma,
    "gemma3": _gemma3,
}

OPTIONAL_DEPENDENCIES: dict[str, str] = {"smolvlm": "num2words"}
"""Python packages a family's processor imports beyond the project's own dependencies."""

import tiny_families  # noqa: E402  (registers the families of tests/tiny_families/ into TINY_FAMILIES)

NEW_FAMILIES: tuple[str, ...] = tuple(sorted(TINY_FAMILIES))
"""Families with a module of their own in tests/tiny_families/ (added after the first eight)."""
ALL_FAMILIES: tuple[str, ...] = FAMILIES + NEW_FAMILIES
for _family in NEW_FAMILIES:
    TEST_IMAGE_SIZES[_family] = TINY_FAMILIES[_family].image_size
    if TINY_FAMILIES[_family].needs:
        OPTIONAL_DEPENDENCIES[_family] = TINY_FAMILIES[_family].needs


def missing_dependency(family: str) -> str | None:
    """The package a family's processor needs that is not installed, or None."""
    package = OPTIONAL_DEPENDENCIES.get(family)
    if package and importlib.util.find_spec(package) is None:
        return package
    return None


def build_tiny(family: str):
    """``(model, processor)`` for ``family``: a tiny random model in eval mode and a real processor."""
    if family in TINY_FAMILIES:
        builder = TINY_FAMILIES[family].build
    elif family in _BUILDERS:
        builder = _BUILDERS[family]
    else:
        raise ValueError(f"no tiny model for family {family!r}; known: {', '.join(ALL_FAMILIES)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return builder()
