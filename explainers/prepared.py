"""What explainers share for one (model, sample): the answer, the final sequence, the positions.

Every explainer explains the model's own greedy answer (or a given answer) on the *final*
sequence, prompt plus answer tokens, in one teacher-forced forward: no KV-cache
approximation, and each answer token is addressed by its position.

A *contrast* (a foil answer, "why purple rather than blue?") changes what is explained to the
difference of two log-probabilities at each answer position, both given the same prompt and
answer prefix: ``log p(answer_t) - log p(foil_t)`` (Yin & Neubig 2022, contrastive
explanations). Positions where the two answers agree give 0; a shorter foil is padded with the
answer's own tokens, a longer one is cut to the answer's length. Explainers that support it
(``Explainer.supports_contrast``) read it through :meth:`Prepared.target_ids`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from xmllm import MissingInput, XmllmError

from .answering import Answer, answer_token_ids, generate_answer, given_answer, on_model
from .explanation import Target

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from .models import ImageLayout, LoadedModel


@dataclass
class ExplainSample:
    """The input of an explainer: images, a question, and optional ground truth."""

    images: "list[Image.Image]"
    question: str
    id: str = "sample"
    expected: str | None = None
    mask: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.images, (list, tuple)):
            self.images = [self.images]
        if not isinstance(self.question, str) or not self.question.strip():
            raise XmllmError("question: must be a non-empty string")


@dataclass(frozen=True)
class Contrast:
    """A foil answer aligned to the explained answer's positions."""

    text: str
    token_ids: tuple[int, ...]
    """One id per answer position: the foil's own token, or the answer's where the foil is shorter."""
    tokens: tuple[str, ...]
    differing: tuple[int, ...]
    """Answer positions (indices into the answer) where the foil's token differs."""
    dropped: int = 0
    """Foil tokens past the answer's length, left out."""

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": list(self.token_ids), "tokens": list(self.tokens),
                "differing": list(self.differing), "dropped": self.dropped,
                "objective": "log p(answer token) - log p(contrast token) at each answer position, both given "
                             "the prompt and the answer's prefix"}


@dataclass
class Prepared:
    """A sample made ready for explaining on one model."""

    loaded: "LoadedModel"
    sample: ExplainSample
    answer: Answer
    inputs: Any
    """Processed inputs of the final sequence (prompt + answer tokens), on the model's device."""
    answer_positions: torch.Tensor
    layouts: "list[ImageLayout]"
    text_positions: torch.Tensor
    """Prompt positions that are neither image tokens nor image markers, answer excluded."""
    contrast: Contrast | None = None
    """The foil of a contrastive explanation, aligned to the answer's positions (None: plain)."""

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def adapter(self):
        return self.loaded.adapter

    @property
    def logit_positions(self) -> torch.Tensor:
        """The positions whose logits predict each answer token."""
        return self.answer_positions - 1

    @property
    def image_positions(self) -> torch.Tensor:
        return torch.cat([l.all_positions for l in self.layouts]) if self.layouts else torch.empty(0, dtype=torch.long)

    @property
    def seq_len(self) -> int:
        return int(self.inputs["input_ids"].shape[-1])

    @property
    def position_count(self) -> int:
        """Positions the layouts may address: :attr:`seq_len`, and for a family that cross-attends to
        the image, its cross-attended tokens after the sequence (``adapter.position_count``)."""
        return self.adapter.position_count(self.inputs)

    def tokens(self) -> list[str]:
        return self.loaded.processor.tokenizer.convert_ids_to_tokens(self.inputs["input_ids"][0].tolist())

    def target_ids(self) -> torch.Tensor:
        """What is explained at each answer position: the answer's token ids ``(T,)``, or with a
        contrast ``(2, T)``: the answer's ids and the foil's, scored as their log-prob difference."""
        ids = torch.as_tensor(self.answer.token_ids, dtype=torch.long)
        if self.contrast is None:
            return ids
        return torch.stack([ids, torch.as_tensor(self.contrast.token_ids, dtype=torch.long)])

    def with_contrast(self, text: str | None) -> "Prepared":
        """This prepared sample explaining ``answer rather than text`` (None: the plain answer)."""
        if text is None:
            return replace(self, contrast=None)
        return replace(self, contrast=align_contrast(self.loaded, self.answer, text))

    def target(self) -> Target:
        toks = self.tokens()
        return Target(
            text=self.answer.text,
            token_ids=list(self.answer.token_ids),
            tokens=list(self.answer.tokens),
            positions=self.answer_positions.tolist(),
            probs=list(self.answer.probs),
            prompt_positions=self.text_positions.tolist(),
            prompt_tokens=[toks[p] for p in self.text_positions.tolist()],
            contrast=self.contrast.text if self.contrast is not None else None,
            contrast_tokens=list(self.contrast.tokens) if self.contrast is not None else [],
        )

    def forward(self, **overrides: Any):
        """One forward of the final sequence; ``overrides`` replace or add model inputs."""
        return self.model(**{**dict(self.inputs), **overrides})

    def answer_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """What is explained at each answer position (the token's log-probability, or the contrast's
        difference), ``logits`` of shape (batch, seq, vocab) -> (batch, T)."""
        pos = self.logit_positions.to(logits.device)
        return score_tokens(torch.log_softmax(logits[:, pos].float(), dim=-1), self.target_ids())


def score_tokens(values: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``values`` (..., T, vocab) at each answer position -> (..., T): the value of answer token t
    at position t, or, for ``token_ids`` of shape (2, T) (a contrast), the answer's minus the
    foil's (for log-probabilities the softmax normaliser cancels: it equals the logit difference)."""
    ids = token_ids.to(values.device)
    steps = torch.arange(ids.shape[-1], device=values.device)
    if ids.ndim == 1:
        return values[..., steps, ids]
    return values[..., steps, ids[0]] - values[..., steps, ids[1]]


def prepare(loaded: "LoadedModel", sample: ExplainSample, answer: Answer | str | None = None,
            contrast: str | None = None, max_new_tokens: int | None = None) -> Prepared:
    """Generate the answer (up to ``max_new_tokens``), or take a given one (an :class:`Answer`, or
    a text scored by the model), and build the final sequence with its positions; ``contrast``
    names a foil answer (see the module docstring)."""
    if answer is None:
        answer = generate_answer(loaded, sample.images, sample.question, max_new_tokens)
    elif isinstance(answer, str):
        answer = given_answer(loaded, sample.images, sample.question, answer)
    if not answer.token_ids:
        raise MissingInput(f"sample {sample.id!r}: the model gave an empty answer; nothing to explain: give the "
                           "answer to explain with --answer TEXT (answer= in the API)")
    adapter = loaded.adapter
    inputs, _ = adapter.build_inputs(sample.images, sample.question)
    inputs, positions = adapter.append_tokens(inputs, list(answer.token_ids))
    inputs = on_model(loaded, inputs)
    layouts = adapter.image_layouts(inputs)
    text = adapter.text_positions(inputs, exclude=positions)
    prepared = Prepared(loaded, sample, answer, inputs, positions, layouts, text.cpu())
    return prepared.with_contrast(contrast) if contrast is not None else prepared


def align_contrast(loaded: "LoadedModel", answer: Answer, text: str) -> Contrast:
    """The foil's tokens aligned to the answer's positions; a one-line error when it equals the answer."""
    foil = answer_token_ids(loaded, text, "contrast")
    n = len(answer.token_ids)
    aligned = tuple(foil[:n]) + tuple(answer.token_ids[len(foil):])
    differing = tuple(i for i in range(n) if aligned[i] != answer.token_ids[i])
    if not differing:
        raise XmllmError(f"contrast {text!r}: the same tokens as the answer {answer.text!r} at every answer "
                         "position; nothing to contrast")
    tokens = tuple(loaded.processor.tokenizer.convert_ids_to_tokens(list(aligned)))
    return Contrast(text.strip(), aligned, tokens, differing, max(0, len(foil) - n))


def as_prepared(loaded: "LoadedModel", sample: "ExplainSample | Prepared") -> Prepared:
    return sample if isinstance(sample, Prepared) else prepare(loaded, sample)


