"""The forward toolkit: score many perturbed copies of one prepared sample in batched forwards.

Every explainer that re-runs the model (perturbation, causal sets, knockout, patching, neurons,
token dropping, uncertainty, gradients' fused kernel) scores through here: teacher-forced
forwards of the final sequence (prompt + answer) that return every answer token's
log-probability at once, batches sized by the memory budget (:mod:`.memory`), a key/value cache
of the shared prompt prefix and logit rows only where the family reproduces the plain forward
(checked on each run), and switching to the fused attention kernel where no attention weights
are read.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .capture import attn_implementations, uses_eager
from xmllm.explainers.prepared import Prepared, score_tokens
from .hooks import Hooks
from .memory import accepts_logits_to_keep, copies_within, forward_copy_bytes
from .params import positive_int

SHORTCUT_TOLERANCE = 1e-4
"""Largest |difference| allowed between the unperturbed answer log-probabilities of a plain forward
and of one through the shortcuts (shared prefix cache, logit rows only) before these are trusted
(float32 forwards differ by ~1e-6); a family whose forward does not resume from a cache, or whose
last block is not row-wise after attention, fails this and runs every copy plainly."""


SHORTCUT_FAILURES = (TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError, NotImplementedError)
"""What a family whose forward cannot take a shortcut raises: that family scores plainly."""


CACHE_KEYWORDS: tuple[str, ...] = ("cache", "past_key_values")
"""What a model's ``forward`` calls its key/value cache argument (transformers 5, then 4)."""


FUSED_KERNEL = "sdpa"
"""The attention kernel perturbation forwards run with: they never need attention weights."""


def _uses_only(found: Mapping[str, Any], kernel: str) -> bool:
    return all(_uses_only(v, kernel) if isinstance(v, Mapping) else v in (kernel, None) for v in found.values())


@contextmanager
def fused_attention(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run the block with the fused attention kernel, then restore the model's own.

    A model loaded with eager attention (for attention explainers) would otherwise pay for
    materialised attention matrices in every perturbed forward; a model without the fused kernel
    keeps its own.
    """
    before = attn_implementations(model.config)
    switched = False
    if enabled and hasattr(model, "set_attn_implementation") and not _uses_only(before, FUSED_KERNEL):
        try:
            model.set_attn_implementation(FUSED_KERNEL)
            switched = True
        except (ValueError, ImportError, NotImplementedError):
            switched = False
    try:
        yield
    finally:
        if switched:
            model.set_attn_implementation(before)



def repeat_inputs(inputs: Mapping[str, Any], copies: int) -> dict[str, Any]:
    """``copies`` copies of a one-row input, concatenated along dim 0.

    For inputs with a batch axis (ids, masks, LLaVA-NeXT's patches) that is the batch; for those
    without one (LLaVA's or Qwen's per-image pixels and grid sizes) the copies' images follow
    each other in batch order, which is how the models read them.
    """
    return {k: v.repeat(copies, *([1] * (v.dim() - 1))) if torch.is_tensor(v) else v for k, v in inputs.items()}


@dataclass(frozen=True)
class SharedPrefix:
    """The decoder's keys and values of the tokens before the first image token, computed once.

    Occlusion changes pixels only, so every occluded copy shares this prefix token for token;
    each batched forward then runs just the rest of the sequence on a batch-wide copy of the cache
    instead of recomputing the prefix per copy. That removes the prefix rows' matrix work; the
    attention of the rest still reads the prefix keys, through an explicit mask where a full
    forward uses the kernel's cheaper causal flag, so on an attention-bound model (the narrow
    576-token bench model, 343 prefix tokens) the two cost the same. Built by
    :func:`shared_prefix`; trusted only once a resumed forward has reproduced the full forward
    (see :func:`occluded_logprobs`).
    """

    length: int
    cache: Any
    keyword: str
    seq_len: int

    def resume(self, inputs: Mapping[str, Any], logit_positions: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
        """Inputs for the tokens after the prefix (per-token tensors cut, the attention mask kept
        whole as the cache needs), a cache copy per row, and the logit positions shifted."""
        rows = int(inputs["input_ids"].shape[0])
        out = {k: v[:, self.length :] if _per_token(k, v, rows, self.seq_len) else v for k, v in inputs.items()}
        cache = copy.deepcopy(self.cache)
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        out[self.keyword] = _prefix_only(cache)
        out["use_cache"] = True
        return out, logit_positions - self.length


def _prefix_only(cache: Any) -> Any:
    """``cache`` made to hand each block the prefix's keys and values followed by the new tokens'
    without keeping the new ones: a resumed forward is never resumed again, and a cache that
    grew would hold every block's keys and values of every copy until the forward ends (on
    LLaVA-1.5-7B, 32 copies of 640 tokens: 10 GiB at full depth). The same tensors reach the
    attention either way; only plain growing layers are changed (others keep their own update)."""
    from transformers.cache_utils import DynamicLayer

    for layer in getattr(cache, "layers", ()):
        if type(layer) is not DynamicLayer:
            continue

        def update(key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, layer: Any = layer,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not layer.is_initialized:  # a block with nothing cached: its keys are the new ones
                return key_states, value_states
            return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)

        layer.update = update
    return cache


def _per_token(key: str, value: Any, rows: int, seq_len: int) -> bool:
    return (key != "attention_mask" and torch.is_tensor(value) and value.dim() >= 2
            and tuple(value.shape[:2]) == (rows, seq_len))


class LogitRows:
    """The last decoder block's work after its attention, run on the rows whose logits are read only.

    After the last block's attention every operation (its output projection, norms, MLP, then the
    final norm and LM head) acts on each row alone, and no later block reads the other rows. So
    the attention output projection and the MLP of that block run on the logit rows only and the
    other rows carry zeros that nothing reads: the kept rows are the same modules on the same
    inputs, so the result is exact, and a teacher-forced forward skips about a sixth of the
    decoder's work per copy on the demo model. Built by :meth:`of` from the adapter's hook points.
    """

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        self.modules = tuple(modules)

    @classmethod
    def of(cls, prep: Prepared) -> LogitRows | None:
        """The last block's ``.attn.out`` and ``.mlp`` points, or None where the adapter lacks one."""
        points = prep.adapter.hook_points()
        last = len(prep.adapter.decoder_layers()) - 1
        names = (f"decoder.blocks.{last}.attn.out", f"decoder.blocks.{last}.mlp")
        if last < 0 or any(name not in points for name in names):
            return None
        return cls([points[name] for name in names])

    @contextmanager
    def only(self, rows: torch.Tensor, seq_len: int) -> Iterator[None]:
        """Within the block, the modules read rows ``rows`` of their (batch, ``seq_len``, d) input
        and write them back into a zero (batch, ``seq_len``, d_out) output."""

        def cut(module: torch.nn.Module, args: tuple) -> tuple:
            hidden = args[0] if args else None
            if not (torch.is_tensor(hidden) and hidden.dim() == 3 and hidden.shape[1] == seq_len):
                raise RuntimeError(f"{type(module).__name__} input is not (batch, {seq_len}, hidden): rows not cut")
            return (hidden.index_select(1, rows.to(hidden.device)), *args[1:])  # a sharded model: the block's device

        def scatter(module: torch.nn.Module, args: tuple, output: Any) -> torch.Tensor:
            if not torch.is_tensor(output):
                raise RuntimeError(f"{type(module).__name__} returns {type(output).__name__}, not a tensor")
            return output.new_zeros(output.shape[0], seq_len, output.shape[-1]).index_copy_(1, rows.to(output.device),
                                                                                           output)

        with Hooks() as hooks:
            for module in self.modules:
                hooks.add(module.register_forward_pre_hook(cut))
                hooks.add(module.register_forward_hook(scatter))
            yield


def logprobs_at(model: torch.nn.Module, inputs: Mapping[str, Any], logit_positions: torch.Tensor,
                token_ids: torch.Tensor | None, prefix: SharedPrefix | None = None,
                rows: LogitRows | None = None) -> torch.Tensor:
    """One forward; log-softmax at ``logit_positions``: (batch, T, vocab), or with ``token_ids``
    the log-probability of token t at position t: (batch, T). With ``prefix`` the forward starts
    after the shared prefix (positions stay those of the whole sequence); with ``rows`` the last
    block's post-attention work runs on the logit rows only."""
    call: dict[str, Any] = {**inputs, "use_cache": False}
    if prefix is not None:
        call, logit_positions = prefix.resume(inputs, logit_positions)
    ids = call["input_ids"]
    pos = logit_positions.to(ids.device)
    keep = accepts_logits_to_keep(model)
    if keep:
        call["logits_to_keep"] = pos
    with rows.only(pos, int(ids.shape[1])) if rows is not None else contextlib.nullcontext():
        logits = model(**call).logits
    if not keep:
        logits = logits[:, pos]
    logp = torch.log_softmax(logits.float(), dim=-1)
    if token_ids is None:
        return logp
    return score_tokens(logp, token_ids)


def _cache_keyword(model: torch.nn.Module) -> str | None:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((k for k in CACHE_KEYWORDS if k in params), None)


def first_image_position(prep: Prepared) -> int | None:
    """The first sequence position that depends on pixels (None without an image)."""
    parts = [layout.all_positions for layout in prep.layouts]
    parts = [p for p in parts if p.numel()]
    return int(torch.cat(parts).min()) if parts else None


@torch.inference_mode()
def shared_prefix(prep: Prepared) -> SharedPrefix | None:
    """The prefix cache for pixel perturbations of ``prep``, or None where it does not apply: no
    tokens before the first image token, or a forward without a cache argument. Not yet trusted:
    :func:`occluded_logprobs` checks a resumed forward against the full one before using it."""
    keyword = _cache_keyword(prep.model)
    start = first_image_position(prep)
    ids = prep.inputs["input_ids"]
    if keyword is None or start is None or start < 1 or ids.shape[0] != 1:
        return None
    # Other per-token inputs (token types, multimodal rope markers) change how the model masks or
    # positions tokens, which a resumed forward need not reproduce: those families run whole.
    if any(_per_token(k, v, 1, ids.shape[1]) for k, v in prep.inputs.items() if k != "input_ids"):
        return None
    head = {"input_ids": ids[:, :start]}
    if "attention_mask" in prep.inputs:
        head["attention_mask"] = prep.inputs["attention_mask"][:, :start]
    try:
        cache = getattr(prep.model(**head, **{keyword: None}, use_cache=True), "past_key_values", None)
    except SHORTCUT_FAILURES:
        return None
    if cache is None or not hasattr(cache, "batch_repeat_interleave") or cache.get_seq_length() != start:
        return None
    return SharedPrefix(start, cache, keyword, int(ids.shape[1]))


@torch.inference_mode()
def batched_logprobs(model: torch.nn.Module, count: int, make_batch: Callable[[int, int], dict[str, Any]],
                     batch_size: int, logit_positions: torch.Tensor, token_ids: torch.Tensor | None,
                     prefix: SharedPrefix | None = None, rows: LogitRows | None = None) -> torch.Tensor:
    """Score ``count`` perturbed copies, ``batch_size`` per forward; ``make_batch(start, stop)``
    builds the model inputs of copies ``start..stop-1``; ``prefix``: their shared prefix cache;
    ``rows``: cut the last block to the logit rows. Returns (count, T) or (count, T, vocab)."""
    chunks = []
    for start in range(0, count, batch_size):
        stop = min(count, start + batch_size)
        chunks.append(logprobs_at(model, make_batch(start, stop), logit_positions, token_ids, prefix, rows).cpu())
    return torch.cat(chunks) if chunks else torch.empty(0)


def batch_size_for(prep: Prepared, batch_size: int | None, *, eager: bool = False,
                   logit_rows: int | None = None, most: int | None = None) -> int:
    """``batch_size`` checked, or when None as many copies of a forward without a graph as the run's
    memory budget fits (:func:`~xmllm.explainers.memory.copies_within`; at most the device's cap or
    ``most``): ``eager`` when the forwards materialise attention weights, ``logit_rows`` when they
    read more rows over the whole vocabulary than the answer's."""
    if batch_size is not None:
        return positive_int("batch_size", batch_size)
    per_copy = forward_copy_bytes(prep, eager=eager, logit_rows=logit_rows)
    return copies_within(per_copy, prep.loaded.device, most=most)


def eager_unless_fused(prep: Prepared, fast_attention: bool) -> bool:
    """Whether forwards run ``with fused_attention(model, fast_attention)`` materialise attention
    weights: the model's own kernel is eager and the fused one was not asked for."""
    return not fast_attention and uses_eager(prep.model)


def answer_ids(prep: Prepared) -> torch.Tensor:
    """What the scored forwards read at each answer position: the answer's token ids, or with a
    contrast the (answer, foil) pair (:meth:`Prepared.target_ids`)."""
    return prep.target_ids()


def base_logprobs(prep: Prepared) -> torch.Tensor:
    """The unperturbed answer tokens' log-probabilities, (T,)."""
    with torch.inference_mode():
        return logprobs_at(prep.model, dict(prep.inputs), prep.logit_positions, answer_ids(prep))[0].cpu()

