"""Fuyu: no vision tower. The image is resized to fit the processor's size, padded to it, cut back to
whole patches; every patch is flattened and linearly projected (``vision_embed_tokens``) into the
decoder's sequence at one ``|SPEAKER|`` placeholder, each row of patches ended by a ``|NEWLINE|``
text token; a Persimmon decoder.

The PIL image processor is the real one: xmllm's Fuyu adapter lets it cut the tensors the processor
hands it (transformers 5.25's ``patchify_image`` works on NumPy arrays only). One shim for the tiny
tokenizer: the processor drops the first token of the placeholders' encoding, the ``"▁"`` Fuyu's
sentencepiece tokenizer writes before every string, so the tiny tokenizer writes a leading space
the same way.
"""
from __future__ import annotations

import transformers
from tiny_parts import (
    HEADS,
    HIDDEN,
    INTERMEDIATE,
    LAYERS,
    MAX_POSITIONS,
    bpe_tokenizer,
    seeded,
    tiny_family,
)

PATCH = 8
SIZE = {"height": 4 * PATCH, "width": 6 * PATCH}  # at most 4 x 6 patches; the test image leaves the last column part padding


class TinyFuyuTokenizer(transformers.PreTrainedTokenizerFast):
    """The BPE tokenizer with sentencepiece's dummy prefix: a space before every string it encodes."""

    def _encode_plus(self, text, *args, is_split_into_words: bool = False, **kwargs):
        if not is_split_into_words:
            if isinstance(text, str):
                text = " " + text
            elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
                text = [" " + t for t in text]
        return super()._encode_plus(text, *args, is_split_into_words=is_split_into_words, **kwargs)


@tiny_family("fuyu", image_size=(64, 48))
def build(model_type: str):
    # |SPEAKER| is the image placeholder, |NEWLINE| ends a row of patches, <0x04> begins the answer
    tokenizer = bpe_tokenizer(bos="<s>", eos="|ENDOFTEXT|", pad="<pad>", unk="<unk>",
                              extra=("|SPEAKER|", "|NEWLINE|", "<0x04>"))  # fmt: skip
    tokenizer.__class__ = TinyFuyuTokenizer
    image_processor = transformers.FuyuImageProcessorPil(size=SIZE, patch_size={"height": PATCH, "width": PATCH})
    processor = transformers.FuyuProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text = transformers.PersimmonConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = transformers.FuyuConfig(
        text_config=text,
        patch_size=PATCH,
        image_size=max(SIZE.values()),
        image_token_id=processor.image_token_id,
    )
    return seeded(lambda: transformers.FuyuForCausalLM(config)), processor
