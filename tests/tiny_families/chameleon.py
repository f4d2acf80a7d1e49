"""Chameleon: early fusion. A VQ-VAE (convolutional encoder, then the nearest of its codebook
vectors) turns the image, resized and centre-cropped to a square, into a grid of codes; each code
is a vocabulary token (``IMGIMG<digits as letters>Z``) that the decoder embeds like text, written
over the ``<image>`` placeholders between ``<racm3:break>`` and ``<eoss>``.

The tiny VQ-VAE downsamples three times (32 x 32 pixels -> 4 x 4 codes) over 16 codes."""
from __future__ import annotations

import transformers
from tiny_parts import (
    HEADS,
    HIDDEN,
    INTERMEDIATE,
    LAYERS,
    MAX_POSITIONS,
    VISION_IMAGE_SIZE,
    bpe_tokenizer,
    seeded,
    tiny_family,
)

CODES = 16
DOWNSAMPLINGS = 3  # channel_multiplier has one more entry
GRID = VISION_IMAGE_SIZE // 2**DOWNSAMPLINGS


def code_name(code: int) -> str:
    """The vocabulary name Chameleon gives a VQ code: its decimal digits as the letters A-J."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


@tiny_family("chameleon", image_size=(64, 48))
def build(model_type: str):
    codes = tuple(code_name(i) for i in range(CODES))
    tokenizer = bpe_tokenizer(bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
                              extra=("<image>", "<racm3:break>", "<eoss>", "<reserved08706>", *codes))  # fmt: skip
    tokenizer.sep_token = "<reserved08706>"
    image_processor = transformers.ChameleonImageProcessorPil(
        size={"shortest_edge": VISION_IMAGE_SIZE},
        crop_size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE},
    )
    processor = transformers.ChameleonProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=GRID * GRID
    )
    vq = transformers.ChameleonVQVAEConfig(
        embed_dim=8, num_embeddings=CODES, latent_channels=32, base_channels=32,
        channel_multiplier=[1] + [2] * DOWNSAMPLINGS, num_res_blocks=1, resolution=VISION_IMAGE_SIZE,
    )  # fmt: skip
    config = transformers.ChameleonConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        vq_config=vq.to_dict(),
        vocabulary_map=tokenizer.get_vocab(),
        image_token_id=processor.image_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return seeded(lambda: transformers.ChameleonForConditionalGeneration(config)), processor
