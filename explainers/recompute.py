"""Recompute instead of keep: decoder and vision blocks under activation checkpointing.

An explainer that differentiates the model (the gradient explainers, ``neurons.top_activations``,
the relevancy explainers) keeps, by default, every block's activations from the forward until
its backward passes are done: at native resolutions that is most of the memory (27-84 GiB at
~3,000 image tokens on 7-8B models, far above the weights). Within :func:`recomputed_blocks`
every decoder and vision block's ``forward`` runs through ``torch.utils.checkpoint`` (non-reentrant),
so a block keeps only its input (one hidden state per block: the checkpoints) and its activations
are recomputed, one block at a time, when the backward reaches it. The model's code is not forked:
each block gets an instance-level ``forward`` that wraps its own, removed on exit.

What it costs: one more forward of every block per backward pass (with ``retain_graph`` every
backward recomputes again). What it does not change: the numbers. The recomputation runs the same
operations on the same inputs (eval mode, the RNG state restored), so gradients equal the kept run's
to float32 rounding; the tests check every differentiating explainer map by map.

Hooks. Forward hooks on a block itself (Grad-CAM's ``keep_output``) run once, outside the
checkpoint. Hooks on modules *inside* a block (attention capture, neuron values) run twice: in the
forward and again in the backward's recomputation. :func:`recomputing` tells them which: it names
the block being recomputed (None in the forward), so a hook can skip recording, or use the
recomputed tensors (the relevancy stream does: each layer's attention weights exist only while
that block's backward runs).

The choice is an explainer parameter, ``recompute``: ``"auto"`` (on where the memory budget of
:mod:`xmllm.explainers.memory` says the kept run would not fit; on a CPU without an explicit
budget it stays off), ``True`` or ``False``. :func:`resolve` turns it into a bool.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

RECOMPUTE_CHOICES: tuple[Any, ...] = ("auto", True, False)
RECOMPUTE_HELP = ("recompute each decoder and vision block in the backward instead of keeping its activations "
                  "(auto: when the memory budget needs it)")

_STATE = threading.local()
"""``blocks``: names of the blocks whose forward this thread is recomputing (innermost last). Per
thread, not a context variable: the recomputation runs on whichever thread runs the backward (the
autograd engine's own, on an accelerator), and the hooks it calls run on that same thread."""
_CACHE_KEYWORDS = ("past_key_values", "past_key_value")


def recomputing() -> str | None:
    """The block (``decoder.blocks.{i}`` / ``vision.blocks.{i}``) being recomputed in a backward pass,
    or None: in the forward, or outside any :func:`recomputed_blocks`."""
    blocks = getattr(_STATE, "blocks", None)
    return blocks[-1] if blocks else None


def _blocks(adapter: Any) -> list[tuple[str, torch.nn.Module]]:
    found: list[tuple[str, torch.nn.Module]] = []
    for prefix, getter in (("decoder.blocks.", "decoder_layers"), ("vision.blocks.", "vision_layers")):
        try:
            layers = list(getattr(adapter, getter)())
        except Exception:  # noqa: BLE001 - an adapter without such blocks (no vision tower)
            layers = []
        found.extend((f"{prefix}{i}", block) for i, block in enumerate(layers))
    return found


def _has_cache(kwargs: dict[str, Any]) -> bool:
    """A key-value cache that the block would append to: recomputing would append twice."""
    return any(kwargs.get(name) is not None for name in _CACHE_KEYWORDS) and kwargs.get("use_cache") is not False


def _wrapped(name: str, original: Callable[..., Any], counter: dict[str, int]) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled() or _has_cache(kwargs):
            return original(*args, **kwargs)
        first = [True]

        def body(*inner_args: Any, **inner_kwargs: Any) -> Any:
            if first[0]:  # the forward itself
                first[0] = False
                return original(*inner_args, **inner_kwargs)
            counter["recomputed"] += 1
            blocks = _STATE.__dict__.setdefault("blocks", [])
            blocks.append(name)
            try:
                return original(*inner_args, **inner_kwargs)
            finally:
                blocks.pop()

        counter["checkpointed"] += 1
        return checkpoint(body, *args, use_reentrant=False, **kwargs)

    forward.xmllm_recomputes = True  # type: ignore[attr-defined]  # how a counter tells a recomputed block
    return forward


def recomputes(block: torch.nn.Module) -> bool:
    """Whether ``block`` is inside :func:`recomputed_blocks` now (its forward checkpointed)."""
    return bool(getattr(block.__dict__.get("forward"), "xmllm_recomputes", False))


@contextlib.contextmanager
def recomputed_blocks(adapter: Any, enabled: bool = True) -> Iterator[dict[str, int]]:
    """Within the block, every decoder and vision block of ``adapter``'s model recomputes its
    activations in the backward (nothing when ``enabled`` is False). Yields counters:
    ``checkpointed`` (block forwards run under a checkpoint) and ``recomputed`` (recomputations in
    backward passes). The blocks' own ``forward`` is restored on exit."""
    counter = {"checkpointed": 0, "recomputed": 0}
    if not enabled:
        yield counter
        return
    patched: list[tuple[torch.nn.Module, Any]] = []
    try:
        for name, block in _blocks(adapter):
            before = block.__dict__.get("forward", _MISSING)
            patched.append((block, before))
            block.forward = _wrapped(name, block.forward, counter)
        yield counter
    finally:
        for block, before in reversed(patched):
            if before is _MISSING:
                del block.forward
            else:
                block.forward = before


_MISSING = object()


def offloaded(model: Any) -> bool:
    """Whether ``model`` (a dispatched one) keeps blocks off the device it computes on: on disk, or
    in CPU memory beside a GPU. A kept backward then holds every such block's loaded weights until
    it ends, which undoes the offload; a recomputed one loads each block again in its turn."""
    placed = getattr(model, "hf_device_map", None) or {}
    places = {str(v) for v in placed.values()}
    return "disk" in places or ("cpu" in places and len(places) > 1)


def resolve(setting: Any, kept_bytes: Callable[[], int], device: torch.device | str, *,
            model: Any = None) -> bool:
    """``recompute`` as a bool: True/False as given; ``"auto"``: on where one kept backward's
    activations (``kept_bytes()``) do not fit the memory budget, or ``model`` is :func:`offloaded`.
    On a CPU without an explicit :func:`~xmllm.explainers.memory.memory_budget` and no offload it
    stays off (memory is not what bounds a CPU run)."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"recompute must be 'auto', True or False, not {setting!r}")
    if model is not None and offloaded(model):
        return True
    from .memory import device_type, explicit_budget, fits

    if device_type(device) == "cpu" and explicit_budget() is None:
        return False
    return not fits(kept_bytes(), device)
