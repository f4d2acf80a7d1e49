"""What an answer-training step consumes: the training samples, their batches (prompt through the
chat template, answer tokens and EOS, loss on those only), the frozen tower's cached features and
LLaVA's forward from them. Shared by stage 2 (:mod:`.train`) and stage 3 (:mod:`.train_pictures`)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .samples import TRAIN_STREAM, DemoSample, generate_sample
from .world import IMAGE_SIZE

if TYPE_CHECKING:  # pragma: no cover
    from .recipe import TrainConfig


def answer_sample(i: int, cfg: "TrainConfig") -> DemoSample:
    """Sample ``i`` of the answer-training set: a description or a question type from the mix."""
    if cfg.describe_every and i % cfg.describe_every == cfg.describe_every - 1:
        qtype = "describe"
    else:
        qtype = cfg.answer_mix[(i - i // cfg.describe_every if cfg.describe_every else i) % len(cfg.answer_mix)]
    return generate_sample(i // cfg.batch, i % cfg.batch, qtype, stream=(TRAIN_STREAM,))


def answer_batch(processor, samples: list[DemoSample]) -> dict[str, torch.Tensor]:
    """Prompt through the chat template, then answer tokens and EOS; loss on those only."""
    tok = processor.tokenizer
    seqs, targets = [], []
    for s in samples:
        ids = _prompt_ids(processor, s.text, len(s.scene.scenes) if s.several else 1)
        answer = tok(s.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(ids + answer)
        targets.append([-100] * len(ids) + answer)
    width = max(map(len, seqs))
    pad = tok.pad_token_id
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, (ids, tgt) in enumerate(zip(seqs, targets)):
        input_ids[r, width - len(ids):] = torch.tensor(ids)
        labels[r, width - len(ids):] = torch.tensor(tgt)
        mask[r, width - len(ids):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "position_ids": position_ids}


_PROMPTS: dict[tuple[int, str, int], list[int]] = {}


def _prompt_ids(processor, question: str, pictures: int = 1) -> list[int]:
    """Token ids of the chat-templated prompt with its image tokens expanded (memoised per vocabulary:
    the world has a few hundred distinct questions)."""
    key = (len(processor.tokenizer), question, pictures)
    if key not in _PROMPTS:
        content = [*({"type": "image"} for _ in range(pictures)), {"type": "text", "text": question}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        _PROMPTS[key] = processor.tokenizer(expand_image_tokens(processor, prompt), add_special_tokens=True)["input_ids"]
    return _PROMPTS[key]


def expand_image_tokens(processor, prompt: str) -> str:
    """The prompt with its ``<image>`` expanded exactly as the processor expands it."""
    n = processor._get_num_multimodal_tokens(image_sizes=[(IMAGE_SIZE, IMAGE_SIZE)])["num_image_tokens"][0]
    return prompt.replace(processor.image_token, processor.image_token * n)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def cached_features(tower, processor, samples: list[DemoSample], chunk: int = 256) -> torch.Tensor:
    """The frozen tower's patch features (CLS dropped, as LLaVA's "default" strategy does)."""
    return cached_features_of_images(tower, processor, [s.image() for s in samples], chunk)


def cached_features_of_images(tower, processor, images: list, chunk: int = 256) -> torch.Tensor:
    """The frozen tower's patch features of ``images``, ``(images, patches, hidden)``."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), chunk):
            pixels = processor.image_processor(images[i:i + chunk], return_tensors="pt")["pixel_values"]
            out.append(tower(pixel_values=pixels).last_hidden_state[:, 1:])
    return torch.cat(out)


def forward_from_features(model, feats: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """LLaVA's forward from precomputed tower features: project them, scatter them into the
    token embeddings at the image-token positions, run the decoder; returns the logits."""
    embeds = model.get_input_embeddings()(batch["input_ids"])
    is_image = (batch["input_ids"] == model.config.image_token_id)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(is_image, model.model.multi_modal_projector(feats).to(embeds.dtype))
    hidden = model.model.language_model(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    ).last_hidden_state
    return model.lm_head(hidden)


def first_token_right(model, processor, feats: torch.Tensor, samples: list[DemoSample]) -> list[bool]:
    """Per sample, whether the teacher-forced first answer token is the model's top token (every
    evaluated answer is one token, so this equals greedy exact match); ``feats`` are the samples'
    pictures' cached features, in order."""
    batch = answer_batch(processor, samples)
    with torch.no_grad():
        logits = forward_from_features(model, feats, batch)
    first = (batch["labels"] != -100).float().argmax(-1)
    rows = torch.arange(len(samples))
    return (logits[rows, first - 1].argmax(-1) == batch["labels"][rows, first]).tolist()
