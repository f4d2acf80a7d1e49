"""Mllama (Llama 3.2 Vision): the image never enters the decoder's sequence. The image processor cuts
it into up to ``max_image_tiles`` square tiles (the best-fitting arrangement of the supported aspect
ratios, padded); a two-stage ViT (local, then global layers, with tile and aspect-ratio position
embeddings) encodes every tile into a class token and its patches (padded to a multiple of 8); a
linear projector turns those into the keys and values of the decoder's cross-attention layers. The
sequence holds one ``<|image|>`` token per image; the cross-attention mask says which text attends
to which image.

A released model's cross-attention gates are trained; at their initial value (0, tanh(0) = 0) the
image would not reach the answer at all, so the tiny model opens them (gate 1)."""
from __future__ import annotations

import transformers
from tiny_parts import HEADS, HIDDEN, INTERMEDIATE, MAX_POSITIONS, VISION_IMAGE_SIZE, bpe_tokenizer, seeded, tiny_family

PATCH = 8
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|image|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@tiny_family("mllama", image_size=(64, 40))
def build(model_type: str):
    tokenizer = bpe_tokenizer(bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
                              extra=("<|image|>", "<|python_tag|>", "<|start_header_id|>", "<|end_header_id|>"),
                              add_bos=True)  # fmt: skip
    image_processor = transformers.MllamaImageProcessorPil(
        size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE}, max_image_tiles=4
    )
    processor = transformers.MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=TEMPLATE)
    vision = transformers.MllamaVisionConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2, num_global_layers=1,
        attention_heads=HEADS, intermediate_layers_indices=[0], vision_output_dim=2 * HIDDEN,
        image_size=VISION_IMAGE_SIZE, patch_size=PATCH, max_num_tiles=4,
    )  # fmt: skip
    text = transformers.MllamaTextConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=3,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, cross_attention_layers=[1],
        max_position_embeddings=MAX_POSITIONS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    config = transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id)
    return seeded(lambda: open_gates(transformers.MllamaForConditionalGeneration(config))), processor


def open_gates(model):
    for layer in model.model.language_model.layers:
        for name in ("cross_attn_attn_gate", "cross_attn_mlp_gate"):
            gate = getattr(layer, name, None)
            if gate is not None:
                gate.data.fill_(1.0)
    return model
