"""Janus: a SigLIP tower on one square vision input per image (the image resized so its longest side
fits, then padded to a square with the mean colour), an MLP aligner, a Llama decoder; a VQ-VAE and
generation head for image generation that explaining never uses."""
from __future__ import annotations

import transformers
from tiny_parts import HIDDEN, LAYERS, VISION_IMAGE_SIZE, bpe_tokenizer, llama_text, seeded, tiny_family
from tiny_parts import vision_kwargs

PATCH = 4
NAMED = {"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"}
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|User|>: ' if message['role'] == 'user' else '<|Assistant|>: ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image_placeholder>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}\n\n{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)


def vq_tiny() -> dict:
    """The smallest VQ-VAE the config takes: the generation half, built but never run here."""
    return dict(embed_dim=8, num_embeddings=16, latent_channels=32, base_channels=32, channel_multiplier=[1, 2],
                num_res_blocks=1, projection_dim=HIDDEN, image_token_embed_dim=HIDDEN, num_hidden_layers=1)  # fmt: skip


@tiny_family("janus", image_size=(64, 40))
def build(model_type: str):
    tokenizer = bpe_tokenizer(bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", named=NAMED,
                              extra=("<|User|>", "<|Assistant|>"), add_bos=True)  # fmt: skip
    tokens = (VISION_IMAGE_SIZE // PATCH) ** 2
    image_processor = transformers.JanusImageProcessorPil(
        size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE}, min_size=PATCH
    )
    processor = transformers.JanusProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=TEMPLATE, num_image_tokens=tokens
    )
    vision = transformers.JanusVisionConfig(
        **vision_kwargs(PATCH), projection_dim=HIDDEN, depth=LAYERS, num_image_tokens=tokens
    )
    config = transformers.JanusConfig(
        text_config=llama_text(len(tokenizer), tokenizer),
        vision_config=vision,
        vq_config=transformers.JanusVQVAEConfig(**vq_tiny()),
        image_token_id=tokenizer.image_token_id,
    )
    return seeded(lambda: transformers.JanusForConditionalGeneration(config)), processor
