"""Greedy answers with per-token probabilities: what every explanation explains."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from .models import LoadedModel


@dataclass(frozen=True)
class Answer:
    """A generated answer, token by token (tokens are addressed by position)."""

    text: str
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    probs: tuple[float, ...]

    def to_json(self) -> dict:
        return {"text": self.text, "token_ids": list(self.token_ids), "tokens": list(self.tokens),
                "probs": [round(p, 6) for p in self.probs]}


def normalise(text: str) -> str:
    """Lower-case, trim punctuation and spaces: the exact-match comparison form."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def is_correct(answer: str, expected: str) -> bool:
    return normalise(answer) == normalise(expected)


@torch.no_grad()
def generate_answer(loaded: "LoadedModel", images: "Sequence[Image.Image]", question: str,
                    max_new_tokens: int | None = None) -> Answer:
    """Greedy decoding through the model's own ``generate``; special tokens are cut off."""
    inputs, _ = loaded.adapter.build_inputs(list(images), question)
    inputs = inputs.to(loaded.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    gen = loaded.model.generation_config
    limit = max_new_tokens or gen.max_new_tokens or 32
    out = loaded.model.generate(
        **inputs, max_new_tokens=limit, do_sample=False, output_scores=True, return_dict_in_generate=True,
    )
    prompt_len = inputs["input_ids"].shape[1]
    new = out.sequences[0, prompt_len:].tolist()
    tokenizer = loaded.processor.tokenizer
    special = set(tokenizer.all_special_ids)
    ids, probs = [], []
    for step, tid in enumerate(new):
        if tid in special:
            break
        ids.append(tid)
        probs.append(float(torch.softmax(out.scores[step][0].float(), -1)[tid]))
    tokens = tuple(tokenizer.convert_ids_to_tokens(ids))
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return Answer(text, tuple(ids), tokens, tuple(probs))
