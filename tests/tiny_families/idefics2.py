"""Idefics2: SigLIP patches of each view (the image split into four crops plus the whole), each
view's patches read by a perceiver resampler into a fixed number of learned latents, which are the
image tokens (between ``<fake_token_around_image>`` tokens); a Mistral decoder."""
from __future__ import annotations

import transformers
from tiny_parts import HEAD_DIM, HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, VISION_IMAGE_SIZE
from tiny_parts import bpe_tokenizer, seeded, tiny_family, vision_kwargs

PATCH = 4
LATENTS = 16  # per view; five views an image with splitting on
TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@tiny_family("idefics2", image_size=(64, 40))
def build(model_type: str):
    tokenizer = bpe_tokenizer(bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", add_bos=True)
    image_processor = transformers.Idefics2ImageProcessorPil(
        size={"shortest_edge": VISION_IMAGE_SIZE, "longest_edge": 2 * VISION_IMAGE_SIZE}, do_image_splitting=True
    )
    processor = transformers.Idefics2Processor(image_processor, tokenizer, image_seq_len=LATENTS,
                                               chat_template=TEMPLATE)  # fmt: skip
    tokenizer = processor.tokenizer  # the processor added <fake_token_around_image>, <image>, <end_of_utterance>
    text = transformers.MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    perceiver = transformers.Idefics2PerceiverConfig(
        hidden_size=HIDDEN, resampler_n_latents=LATENTS, resampler_depth=LAYERS, resampler_n_heads=HEADS,
        resampler_head_dim=HEAD_DIM, num_key_value_heads=HEADS,
    )  # fmt: skip
    config = transformers.Idefics2Config(
        vision_config=transformers.Idefics2VisionConfig(**vision_kwargs(PATCH)),
        perceiver_config=perceiver,
        text_config=text,
        image_token_id=processor.image_token_id,
    )
    return seeded(lambda: transformers.Idefics2ForConditionalGeneration(config)), processor
