"""Greedy answers with per-token probabilities: what every explanation explains."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from .models import LoadedModel


STOPPED_END = "end"
"""Generation stopped at the model's end token (or another special token): the whole answer."""
STOPPED_LIMIT = "length"
"""Generation stopped at ``max_new_tokens``: the answer may be cut."""
GIVEN = "given"
"""Not generated: a given answer, scored by the model (``--answer``)."""
DEFAULT_MAX_NEW_TOKENS = 32
"""Used when neither the caller nor the model's generation config sets a limit."""


@dataclass(frozen=True)
class Answer:
    """An answer, token by token (tokens are addressed by position), with how it came to be:
    ``stopped`` is :data:`STOPPED_END`, :data:`STOPPED_LIMIT` (cut at ``max_new_tokens``) or
    :data:`GIVEN`; ``probs`` are the model's probabilities of each token either way."""

    text: str
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    probs: tuple[float, ...]
    stopped: str | None = None
    max_new_tokens: int | None = None

    @property
    def cut(self) -> bool:
        """True when generation hit its token limit: a longer limit may give a longer answer."""
        return self.stopped == STOPPED_LIMIT

    def to_json(self) -> dict:
        out = {"text": self.text, "token_ids": list(self.token_ids), "tokens": list(self.tokens),
               "probs": [round(p, 6) for p in self.probs]}
        if self.stopped is not None:
            out.update(stopped=self.stopped, max_new_tokens=self.max_new_tokens)
        return out


def normalise(text: str) -> str:
    """Lower-case, trim punctuation and spaces: the exact-match comparison form."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def is_correct(answer: str, expected: str) -> bool:
    return normalise(answer) == normalise(expected)


def check_max_new_tokens(value: object, what: str = "max_new_tokens") -> int | None:
    """``value`` as a positive token count (None: the model's default); a one-line error otherwise."""
    from xmllm import XmllmError

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise XmllmError(f"{what} must be a positive number of tokens, got {value!r}")
    return int(value)


def token_limit(loaded: "LoadedModel", max_new_tokens: int | None) -> int:
    """The generation limit: the caller's (checked where it is given: a run's plan, an explainer's
    declared parameter), else the model's generation config's, else 32."""
    return max_new_tokens or loaded.model.generation_config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS


def context_length(loaded: "LoadedModel") -> int | None:
    """The decoder's position limit (``max_position_embeddings``), if the config states one."""
    text = loaded.model.config.get_text_config()
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_fits(loaded: "LoadedModel", prompt_tokens: int, answer_tokens: int) -> None:
    """Refuse a prompt (question and image tokens) that, with the answer, exceeds the model's
    context: positions past it are outside anything the model was trained on, and the answers it
    gives there mean nothing."""
    from xmllm import XmllmError

    limit = context_length(loaded)
    if limit is not None and prompt_tokens + answer_tokens > limit:
        raise XmllmError(f"question: the prompt is {prompt_tokens} tokens (question, template and image) and the "
                         f"answer up to {answer_tokens} more, over the model's context of {limit} positions; "
                         "shorten the question")


def on_model(loaded: "LoadedModel", inputs: Any) -> Any:
    """Processor outputs on the model's device, floating-point pixels in its dtype."""
    inputs = inputs.to(loaded.device)
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    return inputs


def _inputs(loaded: "LoadedModel", images: "Sequence[Image.Image]", question: str):
    inputs, _ = loaded.adapter.build_inputs(list(images), question)
    return on_model(loaded, inputs)


@torch.no_grad()
def generate_answer(loaded: "LoadedModel", images: "Sequence[Image.Image]", question: str,
                    max_new_tokens: int | None = None) -> Answer:
    """Greedy decoding through the model's own ``generate``, up to ``max_new_tokens`` (default:
    the model's generation config); special tokens end the answer and are cut off. The answer
    records whether it ended by itself or at the limit."""
    limit = token_limit(loaded, max_new_tokens)
    inputs = _inputs(loaded, images, question)
    prompt_len = int(inputs["input_ids"].shape[1])
    check_fits(loaded, prompt_len, limit)
    out = loaded.model.generate(
        **inputs, max_new_tokens=limit, do_sample=False, output_scores=True, return_dict_in_generate=True,
    )
    new = out.sequences[0, prompt_len:].tolist()
    tokenizer = loaded.processor.tokenizer
    special = set(tokenizer.all_special_ids)
    ids, probs = [], []
    stopped = STOPPED_LIMIT
    for step, tid in enumerate(new):
        if tid in special:
            stopped = STOPPED_END
            break
        ids.append(tid)
        probs.append(float(torch.softmax(out.scores[step][0].float(), -1)[tid]))
    if len(new) < limit:  # generate stopped early: an end token (cut above) or a stopping criterion
        stopped = STOPPED_END
    tokens = tuple(tokenizer.convert_ids_to_tokens(ids))
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return Answer(text, tuple(ids), tokens, tuple(probs), stopped, limit)


def check_answer_text(text: object, what: str = "answer") -> str:
    """A given answer or contrast as a non-empty text; a one-line error naming ``what`` otherwise."""
    from xmllm import XmllmError

    if not isinstance(text, str) or not text.strip():
        raise XmllmError(f"{what}: must be a non-empty text")
    return text


def answer_token_ids(loaded: "LoadedModel", text: str, what: str = "answer") -> list[int]:
    """The tokens of a given answer text as the model would write them after its prompt; a
    one-line error naming ``what`` for an empty text, or words the tokenizer does not know."""
    from xmllm import XmllmError

    check_answer_text(text, what)
    ids = loaded.processor.tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise XmllmError(f"{what} {text!r}: the tokenizer makes no tokens of it")
    unknown = unknown_words(loaded, text)
    if unknown:
        raise XmllmError(f"{what} {text!r}: the tokenizer does not know {', '.join(map(repr, unknown))}")
    return [int(i) for i in ids]


@torch.no_grad()
def given_answer(loaded: "LoadedModel", images: "Sequence[Image.Image]", question: str, text: str) -> Answer:
    """A given answer (``--answer``), teacher-forced after the prompt in one forward: each token
    with the probability the model gives it there (what explaining it means)."""
    ids = answer_token_ids(loaded, text)
    inputs = _inputs(loaded, images, question)
    prompt_len = int(inputs["input_ids"].shape[1])
    check_fits(loaded, prompt_len, len(ids))
    full, positions = loaded.adapter.append_tokens(inputs, ids)
    logits = loaded.model(**dict(full), use_cache=False).logits[0, positions.to(loaded.device) - 1].float()
    probs = torch.softmax(logits, -1)[torch.arange(len(ids)), torch.as_tensor(ids, device=logits.device)]
    tokenizer = loaded.processor.tokenizer
    return Answer(tokenizer.decode(ids, skip_special_tokens=True).strip(), tuple(ids),
                  tuple(tokenizer.convert_ids_to_tokens(ids)), tuple(float(p) for p in probs.cpu()), GIVEN, None)


def unknown_words(loaded: "LoadedModel", text: str) -> list[str]:
    """Words of ``text`` the tokenizer can only write as its unknown token (in order, once each):
    the model never sees them, so an answer to a question about them means little."""
    tokenizer = loaded.processor.tokenizer
    unk = tokenizer.unk_token_id
    if unk is None:
        return []
    found: list[str] = []
    for word in re.findall(r"\w+|[^\w\s]", text):
        if word not in found and unk in tokenizer(word, add_special_tokens=False)["input_ids"]:
            found.append(word)
    return found
