"""The demo model's architecture, tokenizer, processor and chat template.

It is a real ``LlavaForConditionalGeneration`` (CLIP vision tower, two-layer projector,
Llama decoder) with a word-level tokenizer over the shape world's vocabulary, saved in
Hugging Face format so that it loads through the same ``from_pretrained`` path as a hub
checkpoint. Sizes are chosen to train on two CPU cores in minutes.
"""
from __future__ import annotations

import itertools
import re

from .pictures import ORDINALS, PICTURE_ANSWERS, PICTURE_QUESTION_TYPES
from .questions import EXTRA_QUESTION_TYPES, NUMBER_WORDS, QUESTION_TYPES
from .world import COLOURS, IMAGE_SIZE, SHAPES

PATCH_SIZE = 16
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% set pictures = message['content'] | selectattr('type', 'equalto', 'image') | list | length %}"
    "{% set seen = namespace(k=0) %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '\\n' }}"
    "{% if pictures > 1 and seen.k < 4 %}{{ ['first', 'second', 'third', 'fourth'][seen.k] }} {% endif %}"
    "<image>{% set seen.k = seen.k + 1 %}{% endif %}{% endfor %}"
    "{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
"""``USER: {question}\n<image> ASSISTANT:``: LLaVA-1.5's roles with the question before the
image, so that under causal attention every image token can already see what is asked
(a small decoder then only has to pool the matching tokens; image-first needs two hops). With
several pictures each is preceded by its ordinal (``first <image> second <image>``), as Qwen2-VL writes
"Picture 1:", so that "which picture" can be read off a word rather than a distance."""
assert all(f"'{w}'" in CHAT_TEMPLATE for w in ORDINALS)

WORD_RE = re.compile(r"\w+|[^\w\s]+")
"""The word splitting of the tokenizer's Whitespace pre-tokenizer, used to build the vocabulary."""


def vocabulary(pictures: bool = True) -> list[str]:
    """Every word the world's questions, answers and chat template use, lower-cased: the single-image
    world's words sorted, then (with ``pictures``) the new words of the questions over several pictures,
    sorted, so that adding them kept every earlier word's id (the demo was trained in that order)."""
    base = _words([*QUESTION_TYPES.values(), *EXTRA_QUESTION_TYPES.values()],
                  ["user", "assistant", ":", *NUMBER_WORDS, "yes", "no", "left", "right", "above", "below", "color", ","])
    if not pictures:
        return base
    more = _words(list(PICTURE_QUESTION_TYPES.values()), [*PICTURE_ANSWERS, *ORDINALS])
    return base + [w for w in more if w not in set(base)]


def _words(question_types: list, extra: list[str]) -> list[str]:
    words: set[str] = set(extra)
    slots = {
        "shape": list(SHAPES),
        "colour": list(COLOURS),
        "a": [f"{c} {s}" for c in COLOURS for s in SHAPES],
        "b": [f"{c} {s}" for c in COLOURS for s in SHAPES],
    }
    for qtype in question_types:
        templates = getattr(qtype, "by_kind", {"": qtype.templates})
        for template in itertools.chain.from_iterable(templates.values()):
            names = re.findall(r"{(\w+)}", template)
            for values in itertools.product(*(slots[n] for n in names)):
                words.update(WORD_RE.findall(template.format(**dict(zip(names, values))).lower()))
    return sorted(words)


def build_tokenizer(pictures: bool = True):
    """A word-level fast tokenizer: one token per word, ``<s>`` prepended (``pictures``: with the
    words of the questions over several pictures)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in vocabulary(pictures):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace("color", "colour")])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=256,
    )
    return fast


def build_processor(pictures: bool = True):
    """LlavaProcessor = CLIP image processor (identity-sized) + our tokenizer + chat template."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(pictures),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer, *, vision_layers: int = 3, decoder_layers: int = 4, hidden: int = 128):
    """The LlavaConfig of the demo model; every number that matters is named here."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=hidden,
        hidden_act="gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=decoder_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        tie_word_embeddings=False,
    )


DESCRIBE_LIMIT = 16
"""The demo's generation limit, above its longest answer (four objects described: 11 tokens)."""


def build_model(tokenizer, seed: int = 0, **sizes):
    """A freshly initialised demo model (deterministic under ``seed``)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(tokenizer, **sizes))
    init_position_embeddings(model.model.vision_tower)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    # the longest answer ("Describe the image." of four objects) is 11 tokens; an end token stops earlier
    model.generation_config.max_new_tokens = DESCRIBE_LIMIT
    model.generation_config.do_sample = False
    return model


def init_position_embeddings(vision_tower) -> None:
    """Start the CLIP tower's (learnable) position embeddings as a 2-D sinusoid.

    Random init makes "where is this patch" nearly invisible next to the patch content, and
    a small model then spends most of its training finding positions; with half the
    channels encoding the row and half the column from the start, left/right/above/below
    are readable at once. The class token's embedding stays zero.
    """
    import math

    import torch

    emb = vision_tower.embeddings
    table = emb.position_embedding.weight
    hidden = table.shape[1]
    grid = int(round(math.sqrt(table.shape[0] - 1)))
    quarter = hidden // 4
    freqs = torch.exp(-math.log(grid * 4.0) * torch.arange(quarter) / quarter) * math.pi
    with torch.no_grad():
        table.zero_()
        for p in range(grid * grid):
            r, c = divmod(p, grid)
            table[1 + p, 0:quarter] = torch.sin(r * freqs)
            table[1 + p, quarter:2 * quarter] = torch.cos(r * freqs)
            table[1 + p, 2 * quarter:3 * quarter] = torch.sin(c * freqs)
            table[1 + p, 3 * quarter:4 * quarter] = torch.cos(c * freqs)
