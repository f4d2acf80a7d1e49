"""What explainers share for one (model, sample): the answer, the final sequence, the positions.

Every explainer explains the model's own greedy answer (or a given answer) on the *final*
sequence, prompt plus answer tokens, in one teacher-forced forward: no KV-cache
approximation, and each answer token is addressed by its position.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from .answering import Answer, generate_answer
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
        if not self.question or not self.question.strip():
            raise ValueError(f"sample {self.id!r}: the question is empty")


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

    def tokens(self) -> list[str]:
        return self.loaded.processor.tokenizer.convert_ids_to_tokens(self.inputs["input_ids"][0].tolist())

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
        )

    def forward(self, **overrides: Any):
        """One forward of the final sequence; ``overrides`` replace or add model inputs."""
        return self.model(**{**dict(self.inputs), **overrides})

    def answer_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-probability of each answer token, ``logits`` of shape (batch, seq, vocab) -> (batch, T)."""
        pos = self.logit_positions.to(logits.device)
        ids = torch.as_tensor(self.answer.token_ids, device=logits.device)
        logp = torch.log_softmax(logits[:, pos].float(), dim=-1)
        return logp[:, torch.arange(len(ids), device=logits.device), ids]


def prepare(loaded: "LoadedModel", sample: ExplainSample, answer: Answer | None = None) -> Prepared:
    """Generate (or take) the answer and build the final sequence with its positions."""
    if answer is None:
        answer = generate_answer(loaded, sample.images, sample.question)
    if not answer.token_ids:
        raise ValueError(f"sample {sample.id!r}: the model gave an empty answer; nothing to explain")
    adapter = loaded.adapter
    inputs, _ = adapter.build_inputs(sample.images, sample.question)
    inputs, positions = adapter.append_tokens(inputs, list(answer.token_ids))
    inputs = inputs.to(loaded.device)
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    layouts = adapter.image_layouts(inputs)
    text = adapter.text_positions(inputs, exclude=positions)
    return Prepared(loaded, sample, answer, inputs, positions, layouts, text.cpu())


def as_prepared(loaded: "LoadedModel", sample: "ExplainSample | Prepared") -> Prepared:
    return sample if isinstance(sample, Prepared) else prepare(loaded, sample)


def sample_from_images(images: "Sequence[Image.Image]", question: str, **kw: Any) -> ExplainSample:
    return ExplainSample(list(images), question, **kw)
