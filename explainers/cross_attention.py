"""Attention and relevancy for a family whose decoder reads the image through cross-attention (Mllama).

Such a decoder interleaves self-attention blocks (text attends to text) with cross-attention blocks
(text queries, the vision tokens as keys and values); no position of its sequence holds an image
token. Positions here are the adapter's extended space (``adapter.position_count``): the sequence,
then the cross-attended vision tokens, which is where the adapter's image layouts point.

Relevancy follows Chefer, Gur and Wolf (2021) for co-attention. With ``A`` the positive part of
gradient x attention, averaged over heads, and ``R`` over (text + image) x (text + image) starting
at the identity, layer by layer from the first:

* a self-attention block: ``R_tt += A_tt R_tt`` and ``R_ti += A_tt R_ti`` (their rules 6-7);
* a cross-attention block: ``R_ti += A_ti R_ii`` and ``R_tt += A_ti R_it`` (rules 10-11), where the
  image tokens never attend to the text (``R_it = 0``) and are not updated in the decoder
  (``R_ii = I``). Rule 10's left factor, the text tokens' own normalised relevancy transposed, is left
  out: in a causal decoder it would credit a token's row with the cross-attention of tokens after it,
  which cannot have shaped its prediction.

Both are one product of ``(I + A_l)`` over an extended matrix whose only non-zero rows are the text's,
so each answer token's row is carried from the last block to the first as in the sequence case (one
backward per answer token, and one for the whole answer).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from xmllm.explainers.prepared import Prepared, score_tokens

from .capture import RESIDUAL_WEIGHT, RolloutOptions, discard_lowest, eager_attention, fuse_heads, rollout_layer
from .params import ParamError
from .relevancy_capture import _capture, _embeddings_require_grad, _single_weights
from .relevancy_propagation import Relevancy

CROSS_ATTN = "decoder.blocks.{}.cross_attn"
SELF_ATTN = "decoder.blocks.{}.attn"


def attention_blocks(prepared: Prepared) -> list[tuple[int, str, str, nn.Module]]:
    """Every decoder block's attention in block order: ``(block, "self" | "cross", hook point, module)``."""
    points = prepared.adapter.hook_points()
    found = []
    for index in range(len(prepared.adapter.decoder_layers())):
        for kind, pattern in (("self", SELF_ATTN), ("cross", CROSS_ATTN)):
            name = pattern.format(index)
            if name in points:
                found.append((index, kind, name, points[name]))
    return found


def silence_unattended(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    """Forward hook (``with_kwargs``) for a cross-attention block whose mask an intervention edited: a
    query left with no key gets no output. A row with every key masked would otherwise attend to all
    of them alike (transformers' Mllama does so for the text before the image), which is no removal."""
    mask = kwargs["attention_mask"]
    empty = ~(mask > torch.finfo(mask.dtype).min / 2).any(dim=-1)[:, 0]  # (batch, queries)
    if not bool(empty.any()):
        return None
    return (output[0].masked_fill(empty[..., None].to(output[0].device), 0.0), *output[1:])


def _weights(explainer: str, prepared: Prepared, blocks: list[tuple[int, str, str, nn.Module]],
             overrides: dict[str, Any], *, grad: bool) -> tuple[Any, list[torch.Tensor]]:
    """One forward of the final sequence with the eager kernel, each block's attention weights kept."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(eager_attention(prepared.model))
        stack.enter_context(torch.enable_grad() if grad else torch.no_grad())
        if grad:
            stack.enter_context(_embeddings_require_grad(prepared))
        store = stack.enter_context(_capture([(name, module) for _, _, name, module in blocks]))
        out = prepared.forward(**overrides)
    return out, _single_weights(explainer, prepared, store, "the cross-attention view")


def attention_weights(prepared: Prepared, explainer: str) -> tuple[list[tuple[int, str]], list[torch.Tensor]]:
    """Each block's ``(block, kind)`` and its attention weights ``(heads, queries, keys)`` (float32, CPU):
    keys are the text for a self-attention block, the vision tokens for a cross-attention one."""
    blocks = attention_blocks(prepared)
    _, weights = _weights(explainer, prepared, blocks, {"use_cache": False}, grad=False)
    return [(index, kind) for index, kind, _, _ in blocks], [w[0].float().cpu() for w in weights]


def attention_rows(prepared: Prepared, explainer: str) -> tuple[list[tuple[int, str]], list[torch.Tensor]]:
    """Each block's attention rows that generated the answer tokens: per block ``(T, heads, keys)``
    over the text (self-attention) or over the vision tokens (cross-attention)."""
    blocks, weights = attention_weights(prepared, explainer)
    positions = prepared.logit_positions
    return blocks, [w.index_select(1, positions).transpose(0, 1) for w in weights]


def cross_rollout(prepared: Prepared, options: RolloutOptions, explainer: str) -> torch.Tensor:
    """Attention rollout (Abnar and Zuidema) over the extended positions: ``(T, positions)``, each
    answer token's generating row of ``F_L ... F_1``, carried from the last block to the first.

    A self-attention block's factor is the usual ``0.5 I + 0.5 A`` on the text (rows normalised). A
    cross-attention block mixes each text token half with itself and half with the vision tokens it
    attends, ``[0.5 I | 0.5 A]`` (rows normalised), as the model computes it: transformers' Mllama
    lets a token before the image (which its cross-attention mask hides) attend to every vision
    token alike and adds that to its state, masking only the block's MLP. The vision tokens, never
    updated in the decoder, keep themselves."""
    blocks = attention_blocks(prepared)
    _, weights = _weights(explainer, prepared, blocks, {"use_cache": False}, grad=False)
    seq, total = prepared.seq_len, prepared.position_count
    positions = prepared.logit_positions
    text = torch.zeros(positions.numel(), seq)
    text[torch.arange(positions.numel()), positions] = 1.0
    image = torch.zeros(positions.numel(), total - seq)
    for (_, kind, _, _), weight in zip(reversed(blocks), reversed(weights)):
        if kind == "self":
            text = text @ rollout_layer(weight[0], options).cpu()
            continue
        attn = discard_lowest(fuse_heads(weight[0], options.head_fusion), options.discard_ratio).cpu()
        mixed = attn * RESIDUAL_WEIGHT
        norm = (1.0 - RESIDUAL_WEIGHT) + mixed.sum(dim=-1)
        image = image + (text / norm) @ mixed
        text = text * ((1.0 - RESIDUAL_WEIGHT) / norm)
    return torch.cat([text, image], dim=-1)


def extended(rows: torch.Tensor, prepared: Prepared) -> torch.Tensor:
    """Rows over the vision tokens ``(..., V)`` placed at their extended positions ``(..., positions)``."""
    count, seq = prepared.position_count, prepared.seq_len
    if rows.shape[-1] != count - seq:
        raise ValueError(f"cross-attention over {rows.shape[-1]} keys, but the adapter numbers {count - seq} "
                         "vision tokens")
    out = rows.new_zeros(*rows.shape[:-1], count)
    out[..., seq:] = rows
    return out


def cross_relevancy(prepared: Prepared, *, target: str, explainer: str) -> Relevancy:
    """Relevancy rows over the extended positions for every answer token and the whole answer."""
    positions = prepared.logit_positions
    blocks = attention_blocks(prepared)
    if not any(kind == "cross" for _, kind, _, _ in blocks):
        raise ParamError(f"{explainer}: {prepared.adapter.model_type} has no cross-attention blocks to read")
    out, weights = _weights(explainer, prepared, blocks, {"use_cache": False, "logits_to_keep": positions}, grad=True)
    count = int(positions.numel())
    logits = out.logits[0]
    if logits.shape[0] != count:  # a model that ignored logits_to_keep
        logits = logits[positions.to(logits.device)]
    values = torch.log_softmax(logits.float(), dim=-1) if target == "logprob" else logits.float()
    per_token = score_tokens(values, prepared.target_ids())
    scalars = torch.cat([per_token, per_token.sum().unsqueeze(0)]) if count > 1 else per_token
    seq, total = prepared.seq_len, prepared.position_count
    rows = torch.zeros(scalars.numel(), total)
    for k in range(scalars.numel()):
        grads = torch.autograd.grad(scalars[k], weights, retain_graph=k < scalars.numel() - 1, allow_unused=True)
        start = torch.zeros(seq)
        start[positions if k == count else positions[k]] = 1.0
        delta = torch.zeros(total)
        for (_, kind, _, _), grad, weight in zip(reversed(blocks), reversed(grads), reversed(weights)):
            if grad is None:
                continue
            abar = (grad[0].float() * weight[0].detach().float()).clamp_min(0).mean(dim=0).cpu()  # (seq, keys)
            step = (start + delta[:seq]) @ abar
            if kind == "self":
                delta[:seq] += step
            else:
                delta[seq:] += step
        rows[k] = delta
    answer = count if count > 1 else 0
    return Relevancy(
        prepared=prepared, target=target, through="decoder",
        decoder=rows[:count], decoder_answer=rows[answer], image=rows[:count], image_answer=rows[answer],
        targets=per_token.detach().cpu(), backward_calls=int(scalars.numel()), batch=1,
        kernel="eager autograd, cross-attention (Chefer et al. 2021 co-attention rules)",
    )
