"""Relevancy for every answer token against its floor and against LVLM-Interpret's way.

Measured side by side (interleaved) in this run, on the demo model and on the 576-image-token
LLaVA-shaped model with a 32-token answer:

* ``relevancy.chefer`` (through the decoder) for all T answer tokens, over the floor of any
  exact per-token gradient method: one forward plus one backward per answer token (each
  backward from the token's logit to the decoder's input, no parameter gradients):
  target ``<= 2``;
* LVLM-Interpret's way over ours: generate step by step with gradients on and the KV cache,
  every step's attention kept in the graph (``retain_grad``), then per step a backward from its
  one-hot logit (``.backward``: parameter gradients too) and the relevancy product over full
  ``n x n`` matrices with its default normalisation, as its ``construct_relevancy_map`` does
  (decoder only): target ``>= 3``.

The floor's backward passes go through autograd's eager attention; ours go through the
explainer's own attention kernel, whose backward skips what is exactly zero, so the first ratio
can be below 1.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from xmllm.explainers.capture import eager_attention
from xmllm.explainers.prepared import Prepared
from xmllm.explainers.methods.relevancy import CheferRelevancy
from xmllm.explainers.relevancy_propagation import compute_relevancy

from . import BenchContext, BenchRow, Timings, interleaved
from .models import LARGE, LONG_QUESTION, MAIN, answer_tokens, forced_prepared, own_prepared

GROUP = CheferRelevancy.id
"""The explainer this case compares with its floor and with LVLM-Interpret's way."""
FLOOR_TARGET = "<= 2"
LVLM_TARGET = ">= 3"


# --- the three ways ----------------------------------------------------------------------------------
# All three take the gradient of the answer token's logit, LVLM-Interpret's target.

TARGET = "logit"


def ours(prepared: Prepared) -> Any:
    return compute_relevancy(prepared, target=TARGET, through="decoder")


def floor(prepared: Prepared) -> None:
    """One forward, then per answer token one backward from its logit to the decoder's input."""
    first = prepared.adapter.hook_points()["decoder.blocks.0"]
    kept: list[torch.Tensor] = []

    def grab(_module: Any, args: tuple, kwargs: dict) -> None:
        kept.append(args[0] if args else kwargs["hidden_states"])

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with eager_attention(prepared.model), torch.enable_grad():
            out = prepared.forward(use_cache=False, logits_to_keep=prepared.logit_positions)
    finally:
        handle.remove()
    count = len(prepared.answer.token_ids)
    ids = torch.as_tensor(prepared.answer.token_ids, device=out.logits.device)
    logits = out.logits[0, torch.arange(count), ids]
    for k in range(count):
        torch.autograd.grad(logits[k], kept[0], retain_graph=k < count - 1)


def _normalised(relevancy: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """LVLM-Interpret's ``handle_residual`` (eqs. 8-9), applied by default to every token's map."""
    hat = relevancy - eye
    sums = hat.sum(dim=-1, keepdim=True)
    sums[sums == 0] = 1
    return hat / sums + eye


def lvlm_interpret(prepared: Prepared) -> list[torch.Tensor]:
    """LVLM-Interpret's relevancy, rebuilt on this model: per generated token, its row of ``R - I``.

    Step-by-step decoding with the KV cache and gradients on (its ``generate`` runs under
    ``torch.enable_grad``); hooks keep each step's attention weights with ``retain_grad``. For
    step t: ``logits_t.backward(one_hot)`` (all parameter gradients too, as ``.backward`` does),
    then ``A_bar`` per layer from the step's own rows and the first step's prompt matrices (the
    KV-cache approximation), padded to full ``n_t x n_t`` matrices, ``R += A_bar @ R`` over them
    (``handle_self_attention_image``) and the normalised map it keeps per token (``handle_residual``).
    """
    model, adapter = prepared.model, prepared.adapter
    modules = [m for name, m in adapter.hook_points().items()
               if name.startswith("decoder.blocks.") and name.endswith(".attn")]
    steps: list[list[torch.Tensor]] = []

    def keep(_module: Any, _args: Any, output: Any) -> None:
        weights = output[1]
        weights.retain_grad()
        if not steps or len(steps[-1]) == len(modules):
            steps.append([])
        steps[-1].append(weights)

    sample = prepared.sample
    inputs, _ = adapter.build_inputs(sample.images, sample.question)
    inputs = inputs.to(prepared.loaded.device)
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(prepared.loaded.dtype)
    answer = list(prepared.answer.token_ids)
    handles = [m.register_forward_hook(keep) for m in modules]
    step_logits: list[torch.Tensor] = []
    try:
        with eager_attention(model), torch.enable_grad():
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            step_logits.append(out.logits[0, -1])
            mask = inputs.get("attention_mask")
            device = inputs["input_ids"].device
            for token in answer[:-1]:
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
                out = model(input_ids=torch.tensor([[token]], device=device), attention_mask=mask,
                            past_key_values=out.past_key_values, use_cache=True)
                step_logits.append(out.logits[0, -1])
    finally:
        for handle in handles:
            handle.remove()

    rows: list[torch.Tensor] = []
    maps: list[torch.Tensor] = []
    previous: list[torch.Tensor] = []
    for step, (logits, token) in enumerate(zip(step_logits, answer)):
        one_hot = torch.nn.functional.one_hot(torch.tensor(token, device=logits.device), logits.shape[-1])
        model.zero_grad()
        logits.backward(gradient=one_hot.to(logits), retain_graph=step < len(answer) - 1)
        size = steps[step][0].shape[-1]
        eye = torch.eye(size, device=logits.device)
        R = eye.clone()
        for layer, weights in enumerate(steps[step]):
            cam = (weights.grad.float() * weights.detach().float()).clamp(min=0).mean(dim=1)[0]
            if step == 0:
                previous.append(cam)
            else:  # earlier rows keep earlier steps' gradients: pad them and append this step's row
                grown = torch.cat([previous[layer], cam.new_zeros(previous[layer].shape[0], 1)], dim=1)
                cam = previous[layer] = torch.cat([grown, cam], dim=0)
            R = R + cam @ R
        maps.append(_normalised(R, eye))  # kept, as LVLM-Interpret keeps every token's map
        rows.append((R - eye)[-1].cpu())
    model.zero_grad(set_to_none=True)
    return rows


# --- measuring ---------------------------------------------------------------------------------------


def _rows(label: str, prepared: Prepared, repeat: int, warmup: int, with_lvlm: bool) -> list[BenchRow]:
    fns: dict[str, Callable[[], Any]] = {"ours": lambda: ours(prepared), "floor": lambda: floor(prepared)}
    if with_lvlm:
        fns["lvlm_interpret"] = lambda: lvlm_interpret(prepared)
    kept: dict[str, Any] = {}
    timings: Timings = interleaved(fns, repeat, warmup, kept)
    shape = {"answer_tokens": len(prepared.answer.token_ids), "seq_len": prepared.seq_len,
             "image_tokens": int(prepared.image_positions.numel()), "target": TARGET, "repeat": repeat,
             "warmup": warmup, "threads": torch.get_num_threads(), "kernel": kept["ours"].kernel,
             **timings.summary()}
    out = [BenchRow(GROUP, "time: relevancy for all answer tokens / (1 forward + 1 backward per token)",
                    timings.ratio("ours", "floor"), FLOOR_TARGET, label,
                    {**shape, "cpu_time_ratio": timings.cpu_ratio("ours", "floor")},
                    ours=timings.seconds("ours"), reference=timings.seconds("floor"), unit="s")]
    if with_lvlm:
        theirs, mine = kept["lvlm_interpret"][0], kept["ours"].decoder[0]
        # Both are exact for the first answer token (nothing cached yet): their rows must agree.
        check = {"first_token_max_abs_difference": float((theirs - mine[: theirs.numel()]).abs().max()),
                 "first_token_row_max": float(mine.abs().max())}
        out.append(BenchRow(GROUP, "speed-up: LVLM-Interpret's retained generation graph / ours",
                            timings.ratio("lvlm_interpret", "ours"), LVLM_TARGET, label,
                            {**shape, "cpu_time_ratio": timings.cpu_ratio("lvlm_interpret", "ours"), **check},
                            ours=timings.seconds("ours"), reference=timings.seconds("lvlm_interpret"), unit="s"))
    return out


def cases(ctx: BenchContext) -> list[BenchRow]:
    rows: list[BenchRow] = []
    if MAIN in ctx.models:
        ctx.tell(f"{GROUP} on {MAIN}")
        rows += _rows(MAIN, own_prepared(ctx.models[MAIN]), repeat=max(ctx.repeat, 1), warmup=1, with_lvlm=False)
    if LARGE in ctx.models:
        loaded = ctx.models[LARGE]
        ctx.tell(f"{GROUP} on {LARGE}")
        # Each run here is T backward passes through ~950 tokens (about a minute a round for the
        # three ways at T = 32), so a one-token round warms all three up rather than a full one;
        # the median of ``repeat`` rounds then keeps one round slowed by another process from
        # deciding the ratio (CPU-time ratios in the details are steadier still).
        _rows(LARGE, forced_prepared(loaded, LONG_QUESTION, 1), repeat=1, warmup=0, with_lvlm=True)
        rows += _rows(LARGE, forced_prepared(loaded, LONG_QUESTION, answer_tokens(ctx)),
                      repeat=1 if ctx.quick else max(ctx.repeat, 1), warmup=0, with_lvlm=True)
    return rows
