"""PP-Chart2Table: GOT-OCR 2's model class (SAM-style encoder, two stride-2 convolutions, a Qwen2
decoder) with its own config and a processor that resizes each image to one encoder input. The
processor expands no placeholder: the checkpoint's chat template writes the image's
``<imgpad>`` tokens itself (``image_seq_length`` of them) inside ``<img>...</img>``."""
from __future__ import annotations

from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, bpe_tokenizer, seeded, tiny_family

PATCH = 4
TILE = 64  # the encoder's input: 16 x 16 patches, 4 x 4 tokens after the projector's two strides
PROJECTOR_STRIDE = 4  # two stride-2 convolutions


def _template(tokens_per_image: int) -> str:
    """The checkpoint's turn markup: each image written out as its ``<imgpad>`` run."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}<img>"
        + "<imgpad>" * tokens_per_image
        + "</img>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


@tiny_family("pp_chart2table", image_size=(80, 48))
def build(model_type: str):
    from transformers import (
        GotOcr2ForConditionalGeneration,
        PPChart2TableConfig,
        PPChart2TableImageProcessorPil,
        PPChart2TableProcessor,
        PPChart2TableVisionConfig,
        Qwen2Config,
    )

    tokenizer = bpe_tokenizer(
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", extra=("<|im_start|>", "<img>", "</img>", "<imgpad>")
    )
    tokens_per_image = (TILE // PATCH // PROJECTOR_STRIDE) ** 2
    image_processor = PPChart2TableImageProcessorPil(size={"height": TILE, "width": TILE})
    processor = PPChart2TableProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=_template(tokens_per_image)
    )
    vision = PPChart2TableVisionConfig(
        hidden_size=HIDDEN,
        output_channels=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=TILE,
        patch_size=PATCH,
        window_size=4,
        global_attn_indexes=[LAYERS - 1],
        mlp_dim=INTERMEDIATE,
        initializer_range=0.02,  # the config's 1e-10 leaves a random tower blind to its pixels
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = PPChart2TableConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<imgpad>"),
        image_seq_length=tokens_per_image,
    )
    return seeded(lambda: GotOcr2ForConditionalGeneration(config)), processor
