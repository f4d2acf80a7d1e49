"""Real-width model configurations for ``xmllm bench --scale``, with where every number comes from.

Each entry holds the architecture numbers of a published checkpoint's ``config.json`` (and its
processor's ``preprocessor_config.json`` where image handling depends on it): hidden size,
heads, key/value heads, MLP width, vocabulary, depth, the vision tower, the image size and patch,
and what that makes in image tokens. They are the well-known published values of the hub
repositories named in ``source``, written down here from those files as published by llava-hf,
Qwen, HuggingFaceM4 and OpenGVLab; this machine has no network, so they were not downloaded for the run.
Where a field is absent from a published config, transformers' default for that config class is
what the checkpoint uses, and the same default applies here.

What is *not* published is kept out of the numbers that cost memory: the tokenizer is the demo's
word-level one plus each family's special tokens (token ids differ from the checkpoint's, the
vocabulary size does not: embeddings and LM head have the published shapes), and the weights are
random. :func:`build` cuts the decoder and the vision tower to a few blocks; the measurement then
projects to the published depth (:mod:`xmllm.bench.scale`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'user' %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
"""LLaVA-1.5's and LLaVA-NeXT (Vicuna)'s prompt: ``USER: <image>\\n{question} ASSISTANT:``."""
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

INTERNVL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""InternVL's (Qwen's) turn markup with its image placeholder (the processor expands it to
``<img>`` + 256 ``<IMG_CONTEXT>`` per tile + ``</img>``)."""
ONEVISION_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""LLaVA-OneVision's (Qwen2's) turn markup with LLaVA's ``<image>`` placeholder."""

LLAVA_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
"""llava-hf/llava-v1.6-vicuna-7b-hf ``image_grid_pinpoints``."""

ONEVISION_PINPOINTS = [[384 * rows, 384 * cols] for rows in range(1, 7) for cols in range(1, 7)]
"""llava-hf/llava-onevision-qwen2-7b-ov-hf ``image_grid_pinpoints``: every grid of 1-6 x 1-6 tiles of
384 px (36 resolutions, 384 x 384 to 2304 x 2304), as the original's ``anyres_max_9`` with
``(1x1),...,(6x6)`` expands."""

CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "image_size": 336, "patch_size": 14, "projection_dim": 768}
"""openai/clip-vit-large-patch14-336 as every llava-hf checkpoint's ``vision_config`` gives it."""
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
"""Vicuna-7B v1.5 (LlamaConfig's defaults, which llava-hf's 7B ``text_config`` leaves implicit) with
llava-hf's 32,064-entry vocabulary (32,000 + ``<image>``, ``<pad>``, padded to a multiple of 64)."""


@dataclass(frozen=True)
class ScaleConfig:
    """One published architecture: its numbers, its source, and the image the bench feeds it."""

    name: str
    source: str
    """The hub repository whose config.json (and preprocessor_config.json) the numbers are from."""
    model_type: str
    text: dict[str, Any]
    vision: dict[str, Any]
    top: dict[str, Any] = field(default_factory=dict)
    """Top-level config fields (feature layer, pinpoints, scale factor)."""
    processor: dict[str, Any] = field(default_factory=dict)
    """The image processor's published settings."""
    image_size: tuple[int, int] = (336, 336)
    """(width, height) the bench image is resized to before the processor."""
    image_tokens: int = 576
    """Image-feature tokens the processor gives for that image (checked when the model is built)."""
    note: str = ""

    @property
    def decoder_layers(self) -> int:
        return int(self.text["num_hidden_layers"])

    @property
    def vision_layers(self) -> int:
        return int(self.vision.get("num_hidden_layers", self.vision.get("depth", 0)))


CONFIGS: tuple[ScaleConfig, ...] = (
    ScaleConfig(
        "llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", "llava", LLAMA_7B, CLIP_L_336,
        {"vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu"},
        {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}},
        (336, 336), 576, "CLIP ViT-L/14 at 336 px: a 24 x 24 grid"),
    ScaleConfig(
        "llava-1.5-13b", "llava-hf/llava-1.5-13b-hf", "llava",
        {**LLAMA_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
         "num_attention_heads": 40, "num_key_value_heads": 40},
        CLIP_L_336,
        {"vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu"},
        {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}},
        (336, 336), 576, "Vicuna-13B v1.5 decoder"),
    ScaleConfig(
        "llava-next-7b", "llava-hf/llava-v1.6-vicuna-7b-hf", "llava_next", LLAMA_7B, CLIP_L_336,
        {"vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
         "image_grid_pinpoints": LLAVA_PINPOINTS, "use_image_newline_parameter": True},
        {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336},
         "image_grid_pinpoints": LLAVA_PINPOINTS},
        (672, 672), 2928,
        "any-res at 672 x 672: base view + 2 x 2 tiles = 5 x 576 = 2,880 features (the paper's count), plus one "
        "image_newline per row of the 48 x 48 tile grid = 2,928 tokens"),
    ScaleConfig(
        "qwen2-vl-7b", "Qwen/Qwen2-VL-7B-Instruct", "qwen2_vl",
        {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
         "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
         "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
         "tie_word_embeddings": False},
        {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "hidden_size": 3584,
         "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        {},
        {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 3136, "max_pixels": 12845056},
        (672, 672), 576,
        "dynamic resolution: a 672 x 672 image is 48 x 48 patches, merged 2 x 2 into 24 x 24 = 576 tokens "
        "(the count grows with the image, up to 16,384 at max_pixels)"),
    ScaleConfig(
        "idefics3-8b", "HuggingFaceM4/Idefics3-8B-Llama3", "idefics3",
        {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 8, "vocab_size": 128259, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
         "rope_theta": 500000.0},
        {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
         "image_size": 364, "patch_size": 14},
        {"scale_factor": 2, "tie_word_embeddings": False},
        {"size": {"longest_edge": 1456}, "max_image_size": {"longest_edge": 364}, "do_image_splitting": True,
         "image_seq_len": 169},
        (364, 364), 2873,
        "the processor resizes the longest edge to 4 x 364 and splits it into 4 x 4 tiles plus a global view: "
        "17 x 169 = 2,873 tokens (SigLIP so400m, 26 x 26 patches per tile, pixel shuffle 2)"),
    ScaleConfig(
        "qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl",
        {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
         "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
         "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
         "tie_word_embeddings": False},
        {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "hidden_act": "silu",
         "in_channels": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
         "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
         "tokens_per_second": 2},
        {"tie_word_embeddings": False},
        {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 3136, "max_pixels": 12845056},
        (1024, 1024), 1369,
        "dynamic resolution at 1024 x 1024: smart_resize rounds each side to a multiple of 28 (1036), "
        "74 x 74 patches merged 2 x 2 into 37 x 37 = 1,369 tokens; a windowed vision tower (112-px windows, "
        "full attention in blocks 7, 15, 23, 31; SwiGLU MLP) projecting to the decoder's 3,584"),
    ScaleConfig(
        "internvl3.5-8b", "OpenGVLab/InternVL3_5-8B-HF", "internvl",
        {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
         "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
         "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False},
        {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
         "image_size": [448, 448], "patch_size": [14, 14], "hidden_act": "gelu", "norm_type": "layer_norm",
         "layer_norm_eps": 1e-6, "layer_scale_init_value": 0.1, "use_qk_norm": False, "attention_bias": True,
         "use_absolute_position_embeddings": True, "use_mean_pooling": True},
        {"downsample_ratio": 0.5, "image_seq_length": 256, "projector_hidden_act": "gelu",
         "vision_feature_layer": -1, "vision_feature_select_strategy": "default", "tie_word_embeddings": False},
        {"size": {"height": 448, "width": 448}, "crop_to_patches": True, "min_patches": 1, "max_patches": 12},
        (1792, 1344), 3328,
        "InternViT-300M (448 px, 32 x 32 patches, pixel shuffle 0.5: 256 tokens a tile) + Qwen3-8B; a 4:3 "
        "image of 1792 x 1344 is cut into 4 x 3 = 12 tiles, the published max_dynamic_patch, plus a thumbnail: "
        "13 x 256 = 3,328 tokens"),
    ScaleConfig(
        "llava-onevision-7b", "llava-hf/llava-onevision-qwen2-7b-ov-hf", "llava_onevision",
        {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
         "num_key_value_heads": 4, "vocab_size": 152128, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
         "rope_theta": 1000000.0, "tie_word_embeddings": False},
        {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 26, "num_attention_heads": 16,
         "image_size": 384, "patch_size": 14, "vision_use_head": False},
        {"vision_feature_layer": -1, "vision_feature_select_strategy": "full", "projector_hidden_act": "gelu",
         "image_grid_pinpoints": ONEVISION_PINPOINTS, "vision_aspect_ratio": "anyres_max_9",
         "tie_word_embeddings": False},
        {"size": {"height": 384, "width": 384}, "image_grid_pinpoints": ONEVISION_PINPOINTS,
         "num_image_tokens": 729},
        (768, 768), 3699,
        "SigLIP so400m (384 px, 27 x 27 = 729 features a tile, all kept) + Qwen2-7B; anyres at 768 x 768: "
        "2 x 2 tiles = 54 x 54 = 2,916 features (under anyres_max_9's 9 x 729, so not shrunk) + one "
        "image_newline per row (54) + the 729-feature base view = 3,699 tokens; a picture of 1,000 px or "
        "more takes the 3 x 3 grid, 81 x 81 + 81 + 729 = 7,371"),
)



# --- tokenizer and processor ---------------------------------------------------------------------------

_QWEN_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                  "<|video_pad|>", "<|endoftext|>")
_INTERNVL_SPECIALS = {"start_image_token": "<img>", "end_image_token": "</img>",
                      "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
_ONEVISION_SPECIALS = ("<|im_start|>", "<|im_end|>", "<video>")
_IDEFICS_SPECIALS = ("<|im_start|>", "<fake_token_around_image>", "<end_of_utterance>", "<global-img>",
                     *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)))


def _tokenizer(specials: tuple[str, ...] = ()) -> Any:
    """The demo's word-level tokenizer plus ``specials``, with room for long prompts."""
    from xmllm.explainers.demo.model import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 1 << 15
    tokenizer.padding_side = "right"
    if specials:
        tokenizer.add_tokens(list(specials), special_tokens=True)
    return tokenizer


def _named(tokenizer: Any, named: dict[str, str]) -> Any:
    """``tokenizer`` with ``named`` special tokens added and readable as attributes (``x`` and ``x_id``),
    as InternVL's processor reads them from its tokenizer."""
    tokenizer.add_tokens(list(named.values()), special_tokens=True)
    for name, token in named.items():
        setattr(tokenizer, name, token)
        setattr(tokenizer, f"{name}_id", tokenizer.convert_tokens_to_ids(token))
    return tokenizer


def _image_only(processor_cls: type) -> type:
    """``processor_cls`` accepting a bare video processor (the family's own needs torchvision)."""

    def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor":
            return type(argument)
        return processor_cls.check_argument_for_proper_class(self, argument_name, argument)

    return type(f"{processor_cls.__name__}ImageOnly", (processor_cls,),
                {"check_argument_for_proper_class": check_argument_for_proper_class})


def build_processor(config: ScaleConfig) -> Any:
    """The family's real processor class with the published image settings."""
    import transformers as tf

    p = config.processor
    if config.model_type == "llava":
        image = tf.CLIPImageProcessorPil(size=p["size"], crop_size=p["crop_size"])
        return tf.LlavaProcessor(image_processor=image, tokenizer=_tokenizer(), patch_size=14,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                 chat_template=LLAVA_TEMPLATE)
    if config.model_type == "llava_next":
        image = tf.LlavaNextImageProcessorPil(size=p["size"], crop_size=p["crop_size"],
                                              image_grid_pinpoints=p["image_grid_pinpoints"])
        return tf.LlavaNextProcessor(image_processor=image, tokenizer=_tokenizer(), patch_size=14,
                                     vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                     chat_template=LLAVA_TEMPLATE)
    if config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        from transformers.video_processing_utils import BaseVideoProcessor

        tokenizer = _tokenizer(_QWEN_SPECIALS)
        tokenizer.image_token = "<|image_pad|>"  # the demo tokenizer names <image>; Qwen's processor reads this
        # Qwen2.5-VL's preprocessor_config.json names Qwen2VLImageProcessor: the same smart_resize
        image = tf.Qwen2VLImageProcessorPil(patch_size=p["patch_size"], merge_size=p["merge_size"],
                                            temporal_patch_size=p["temporal_patch_size"],
                                            min_pixels=p["min_pixels"], max_pixels=p["max_pixels"])
        cls = tf.Qwen2VLProcessor if config.model_type == "qwen2_vl" else tf.Qwen2_5_VLProcessor
        return _image_only(cls)(image_processor=image, tokenizer=tokenizer,
                                video_processor=BaseVideoProcessor(), chat_template=QWEN_TEMPLATE)
    if config.model_type == "internvl":
        from transformers.video_processing_utils import BaseVideoProcessor

        tokenizer = _named(_tokenizer(("<|im_start|>", "<|im_end|>")), _INTERNVL_SPECIALS)
        image = tf.GotOcr2ImageProcessorPil(size=p["size"], crop_to_patches=p["crop_to_patches"],
                                            min_patches=p["min_patches"], max_patches=p["max_patches"])
        return _image_only(tf.InternVLProcessor)(image_processor=image, tokenizer=tokenizer,
                                                 video_processor=BaseVideoProcessor(),
                                                 image_seq_length=config.top["image_seq_length"],
                                                 chat_template=INTERNVL_TEMPLATE)
    if config.model_type == "llava_onevision":
        from transformers.video_processing_utils import BaseVideoProcessor

        image = tf.LlavaOnevisionImageProcessorPil(size=p["size"], image_grid_pinpoints=p["image_grid_pinpoints"])
        return _image_only(tf.LlavaOnevisionProcessor)(
            image_processor=image, tokenizer=_tokenizer(_ONEVISION_SPECIALS), video_processor=BaseVideoProcessor(),
            num_image_tokens=p["num_image_tokens"], vision_feature_select_strategy="full",
            vision_aspect_ratio=config.top["vision_aspect_ratio"], chat_template=ONEVISION_TEMPLATE)
    if config.model_type == "idefics3":
        image = tf.Idefics3ImageProcessorPil(size=p["size"], max_image_size=p["max_image_size"],
                                             do_image_splitting=p["do_image_splitting"])
        return tf.Idefics3Processor(image, _tokenizer(_IDEFICS_SPECIALS), image_seq_len=p["image_seq_len"],
                                    chat_template=IDEFICS3_TEMPLATE)
    raise ValueError(f"no processor recipe for {config.model_type!r}")


# --- the model -----------------------------------------------------------------------------------------


def hf_config(config: ScaleConfig, processor: Any, decoder_layers: int | None = None,
              vision_layers: int | None = None) -> Any:
    """The transformers config of ``config`` with its depths cut to ``decoder_layers`` /
    ``vision_layers`` (None: the published depth) and the tokenizer's special-token ids."""
    import transformers as tf

    tokenizer = processor.tokenizer
    text = {**config.text, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    vision = dict(config.vision)
    if decoder_layers is not None:
        text["num_hidden_layers"] = decoder_layers
    if vision_layers is not None:
        vision["depth" if "depth" in vision else "num_hidden_layers"] = vision_layers
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    if config.model_type in ("llava", "llava_next"):
        cls = tf.LlavaConfig if config.model_type == "llava" else tf.LlavaNextConfig
        extra = {"image_seq_length": config.image_tokens} if config.model_type == "llava" else {}
        return cls(vision_config=tf.CLIPVisionConfig(**vision), text_config=tf.LlamaConfig(**text),
                   image_token_id=image_token, **config.top, **extra)
    if config.model_type == "qwen2_vl":
        ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
        text["bos_token_id"] = None
        return tf.Qwen2VLConfig(vision_config=tf.Qwen2VLVisionConfig(**vision),
                                text_config=tf.Qwen2VLTextConfig(**text), **ids, **config.top)
    if config.model_type == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
            Qwen2_5_VLTextConfig,
            Qwen2_5_VLVisionConfig,
        )

        ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
        text["bos_token_id"] = None
        return tf.Qwen2_5_VLConfig(vision_config=Qwen2_5_VLVisionConfig(**vision),
                                   text_config=Qwen2_5_VLTextConfig(**text), **ids, **config.top)
    if config.model_type == "internvl":
        text["bos_token_id"] = None
        return tf.InternVLConfig(vision_config=tf.InternVLVisionConfig(**vision), text_config=tf.Qwen3Config(**text),
                                 image_token_id=tokenizer.context_image_token_id, **config.top)
    if config.model_type == "llava_onevision":
        text["bos_token_id"] = None
        return tf.LlavaOnevisionConfig(vision_config=tf.SiglipVisionConfig(**vision), text_config=tf.Qwen2Config(**text),
                                       image_token_index=image_token,
                                       video_token_index=tokenizer.convert_tokens_to_ids("<video>"), **config.top)
    if config.model_type == "idefics3":
        vision_cls = tf.Idefics3Config.sub_configs["vision_config"]
        return tf.Idefics3Config(vision_config=vision_cls(**vision), text_config=tf.LlamaConfig(**text).to_dict(),
                                 image_token_id=image_token, pad_token_id=tokenizer.pad_token_id, **config.top)
    raise ValueError(f"no config recipe for {config.model_type!r}")


def _model_class(model_type: str) -> type:
    import transformers as tf

    return {"llava": tf.LlavaForConditionalGeneration, "llava_next": tf.LlavaNextForConditionalGeneration,
            "qwen2_vl": tf.Qwen2VLForConditionalGeneration,
            "idefics3": tf.Idefics3ForConditionalGeneration,
            "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration, "internvl": tf.InternVLForConditionalGeneration,
            "llava_onevision": tf.LlavaOnevisionForConditionalGeneration}[model_type]


def skeleton(config: ScaleConfig, processor: Any, decoder_layers: int | None = None,
             vision_layers: int | None = None) -> torch.nn.Module:
    """The model with every parameter on the meta device: no memory, no initialisation."""
    from .free_compute import parameters_on_meta

    hf = hf_config(config, processor, decoder_layers, vision_layers)
    with warnings.catch_warnings(), parameters_on_meta():
        warnings.simplefilter("ignore")
        return _model_class(config.model_type)(hf)


def parameter_count(config: ScaleConfig, processor: Any | None = None) -> int:
    """Parameters of the published architecture at full depth (counted on the meta device)."""
    model = skeleton(config, processor or build_processor(config))
    return sum(p.numel() for p in model.parameters())


def build(config: ScaleConfig, decoder_layers: int, vision_layers: int, *, values: str = "free",
          device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, processor: Any = None,
          seed: int = 0) -> Any:
    """A :class:`~xmllm.explainers.models.LoadedModel` of ``config`` cut to the given depths, with
    eager attention (as ``xmllm explain`` loads a model): ``values="free"`` for the free-arithmetic
    measurement (:mod:`xmllm.bench.free_compute`), ``"random"`` for real arithmetic (a GPU)."""
    from xmllm.explainers.models import LoadedModel, adapter_for

    from .free_compute import materialise

    processor = processor or build_processor(config)
    model = materialise(skeleton(config, processor, decoder_layers, vision_layers), dtype, device,
                        values=values, seed=seed)
    model.set_attn_implementation("eager")
    model.generation_config.eos_token_id = None  # generations run to their limit: the worst case, set by it
    return LoadedModel(model, processor, adapter_for(model, processor), spec=f"{config.name} (random, cut)",
                       source=config.source, device=torch.device(device), dtype=dtype, eager_attention=True)


def bench_image(config: ScaleConfig) -> Image.Image:
    """The bench sample's image (the demo world's) at the size this config is measured with."""
    from .models import demo_sample

    return demo_sample().images[0].convert("RGB").resize(config.image_size, Image.BICUBIC)
