"""The logit-lens read-out: the residual stream after a decoder block, read through the model's
own final norm and LM head (``adapter.unembed``, which also applies a family's logit cap).

Shared by the explainers that read the model's intermediate states as next-token distributions
(the per-layer lens over the answer and image tokens, the per-layer entropy of the answer), so
that each reads the stream the same way and cites the same source.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from xmllm.explainers.prepared import Prepared
from .hooks import Hooks
from .memory import accepts_logits_to_keep
from .params import ParamError
from .registry import Citation

BLOCK_POINT = "decoder.blocks.{}"
READOUT = "final norm + LM head (+ the family's logit cap) on the residual stream after each decoder block"

LOGIT_LENS = Citation("interpreting GPT: the logit lens", 2020, None, "nostalgebraist")


def pick_layers(layers: Any, count: int, owner: str | None = None) -> list[int]:
    """Decoder block indices (negative ones count from the end), or all when None; checked against
    the model's depth (a declared ``tuple[int, ...]`` parameter is already a list of integers; a raw
    value from a caller that did not declare it is checked here too). ``owner`` (an explainer id)
    prefixes the error."""
    prefix = f"{owner}: " if owner else ""
    if layers is None:
        return list(range(count))
    if isinstance(layers, (int, str, bool)) or not all(
        isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in layers
    ):
        raise ParamError(f"{prefix}parameter layers={layers!r} must be a list of decoder block indices or None")
    picked = [int(i) + count if i < 0 else int(i) for i in layers]
    if not picked or any(not 0 <= i < count for i in picked):
        raise ParamError(f"{prefix}parameter layers={list(layers)!r}: the decoder has blocks 0..{count - 1}")
    return picked


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.inference_mode()
def residual_states(prep: Prepared, positions: torch.Tensor, layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One teacher-forced forward of the final sequence.

    Returns the residual stream after each block in ``layers`` at ``positions``,
    ``(len(layers), P, hidden)`` in the model's dtype and device, and the model's own logits at
    those positions ``(P, vocab)`` in float32. Only the picked rows are kept per block.
    """
    points = prep.adapter.hook_points()
    pos = positions.to(prep.loaded.device)
    kept: dict[int, torch.Tensor] = {}

    def keep(index: int):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            hidden = _block_output(output)[0]
            kept[index] = hidden.index_select(0, pos.to(hidden.device)).detach().to(pos.device)  # a sharded model's block

        return hook

    rows_only = accepts_logits_to_keep(prep.model)  # logits of the kept rows only, not (seq x vocabulary)
    with Hooks() as hooks:
        for i in layers:
            hooks.add(points[BLOCK_POINT.format(i)].register_forward_hook(keep(i)))
        out = prep.forward(use_cache=False, **({"logits_to_keep": pos} if rows_only else {}))
    missing = [i for i in layers if i not in kept]
    if missing:
        raise RuntimeError(f"decoder blocks {missing} did not run in the forward")
    logits = (out.logits[0] if rows_only else out.logits[0].index_select(0, pos)).float()
    return torch.stack([kept[i] for i in layers]), logits


@torch.inference_mode()
def lens_logprobs(prep: Prepared, states: torch.Tensor) -> Iterator[torch.Tensor]:
    """Per layer of ``states`` ``(L, P, hidden)``: the lens's log-probabilities ``(P, vocab)``.

    One layer at a time, so only one ``P x vocab`` block is alive whatever the depth.
    """
    for layer_states in states:
        yield torch.log_softmax(prep.adapter.unembed(layer_states).float(), dim=-1)


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats over the last axis of log-probabilities (0 log 0 counts as 0)."""
    probs = logprobs.exp()
    return -torch.where(probs > 0, probs * logprobs, torch.zeros_like(probs)).sum(-1)


__all__ = ["BLOCK_POINT", "LOGIT_LENS", "READOUT", "entropy", "lens_logprobs", "pick_layers", "residual_states"]
