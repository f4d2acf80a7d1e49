"""Capturing attention weights for relevancy propagation (:mod:`.relevancy_propagation`): the hook
points, forward hooks that keep each block's weights (or only their shape, when a recomputed backward
rebuilds them), the decoder input kept in the graph, and the one-line refusal of a model whose
attention returns no weights."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from xmllm import MissingInput
from xmllm.explainers.prepared import Prepared

from .hooks import Hooks
from .params import ParamError
from .recompute import recomputing

VISION_ATTN_PREFIX = "vision.blocks."
DECODER_ATTN_PREFIX = "decoder.blocks."
ATTN_SUFFIX = ".attn"


def _attention_modules(prepared: Prepared, prefix: str) -> list[tuple[str, torch.nn.Module]]:
    """The ``{prefix}{i}.attn`` hook points, in block order."""
    points = prepared.adapter.hook_points()
    found = [(name, mod) for name, mod in points.items() if name.startswith(prefix) and name.endswith(ATTN_SUFFIX)]
    return sorted(found, key=lambda item: int(item[0][len(prefix) : -len(ATTN_SUFFIX)]))


class _Seen:
    """What the forward recorded of one attention call when its weights are not kept (streamed with
    recompute): whether they were a tensor, and their shape."""

    def __init__(self, weights: Any) -> None:
        self.tensor = torch.is_tensor(weights)
        self.shape = tuple(weights.shape) if self.tensor else ()

    def dim(self) -> int:
        return len(self.shape)


@contextlib.contextmanager
def _capture(modules: list[tuple[str, torch.nn.Module]], light: bool = False,
             taps: Any = None) -> Iterator[dict[str, list[Any]]]:
    """Forward hooks keeping each attention module's weights (its output[1]), graph attached.

    Under :func:`~xmllm.explainers.recompute.recomputed_blocks` an attention module runs again in
    the backward; those calls are not recorded (the forward's are what the store holds), except
    that ``taps`` (the propagation's ``_RecomputedTaps``) receive the recomputed weights. ``light``: the store holds a :class:`_Seen` per
    call instead of the weights, so no layer's attention outlives its block's forward."""
    store: dict[str, list[Any]] = {name: [] for name, _ in modules}
    with Hooks() as hooks:
        for name, module in modules:

            def hook(_module: torch.nn.Module, _args: Any, output: Any, name: str = name) -> None:
                weights = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
                if recomputing() is not None:
                    if taps is not None and torch.is_tensor(weights):
                        taps.recomputed(name, weights)
                    return
                if not light:
                    store[name].append(weights)
                    return
                if taps is not None and torch.is_tensor(weights) and weights.requires_grad:
                    taps.tap(name, weights, hooks)
                store[name].append(_Seen(weights))

            hooks.add(module.register_forward_hook(hook))
        yield store


@contextlib.contextmanager
def _embeddings_require_grad(prepared: Prepared, edges: list[Any] | None = None) -> Iterator[None]:
    """Keep the decoder's input in the graph even where no parameter requires grad (a frozen model);
    ``edges`` receives the gradient edge of each such input (a backward to it runs through every block)."""

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
        if not (torch.is_tensor(output) and output.is_floating_point()):
            return None
        out = output if output.requires_grad else output.detach().requires_grad_().clone()
        if edges is not None:
            edges.append(torch.autograd.graph.get_gradient_edge(out))
        return None if out is output else out

    with Hooks() as hooks:
        hooks.add(prepared.adapter.hook_points()["decoder.embed"].register_forward_hook(hook))
        yield


def _single_weights(explainer: str, prepared: Prepared, store: dict[str, list[Any]], what: str) -> list[torch.Tensor]:
    """One attention-weights tensor per block, or a one-line error saying why there is none."""
    out = []
    for name, calls in store.items():
        if len(calls) != 1:
            raise ValueError(f"{explainer}: {name} ran {len(calls)} times in one forward; expected once")
        weights = calls[0]
        if not (torch.is_tensor(weights) or (isinstance(weights, _Seen) and weights.tensor)) or weights.dim() != 4:
            vision = name.startswith(VISION_ATTN_PREFIX)
            hint = "; use through='decoder'" if vision else ""
            # through the vision tower, a parameter value this model cannot take; in the decoder, a
            # model the explainer cannot run on
            raise (ParamError if vision else MissingInput)(
                f"{explainer}: {prepared.adapter.model_type}'s {name} returns no attention weights even with the "
                f"eager kernel, which {what} needs{hint}"
            )
        out.append(weights)
    return out
