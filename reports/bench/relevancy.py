"""Relevancy for every answer token against its floor and against LVLM-Interpret's way.

Measured side by side (interleaved) in this run, on the demo model and on the 576-image-token
LLaVA-shaped model with a 32-token answer:

* ``relevancy.chefer`` (through the decoder) for all T answer tokens, over the floor of any
  exact per-token gradient method: one forward plus one backward per answer token (each
  backward from the token's logit to the decoder's input, no parameter gradients):
  target ``<= 2``;
* LVLM-Interpret's way over ours: generate step by step with gradients on and the KV cache,
  every step's attention kept in the graph (``retain_grad``), then per step a backward from its
  one-hot logit and the relevancy product over full ``n x n`` matrices, as its
  ``construct_relevancy_map`` does (decoder only): target ``>= 3``.
"""
from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from explainers.answering import Answer
from explainers.capture import eager_attention
from explainers.context import ExplainSample, Prepared, prepare
from explainers.methods.relevancy import compute_relevancy

from . import BenchContext, BenchRow
from .models import ANSWER_TOKENS, ANSWER_WORDS, LARGE, LONG_QUESTION, QUICK_ANSWER_TOKENS, large_model

GROUP = "relevancy.chefer"
FLOOR_TARGET = "<= 2"
LVLM_TARGET = ">= 3"
SAMPLE_SEED = 0


# --- models and samples -----------------------------------------------------------------------------


def _forced(loaded: Any, question: str, tokens: int) -> Prepared:
    """The final sequence with an answer of exactly ``tokens`` word tokens (a random model's own
    answer could stop early or emit special tokens); the cost does not depend on which words."""
    from explainers.demo.samples import generate_sample

    text = " ".join([ANSWER_WORDS] * (tokens // len(ANSWER_WORDS.split()) + 1))
    ids = loaded.adapter.tokenize_answer(text)[:tokens]
    tokenizer = loaded.processor.tokenizer
    answer = Answer(tokenizer.decode(ids), tuple(ids), tuple(tokenizer.convert_ids_to_tokens(ids)),
                    tuple(0.0 for _ in ids))
    image = generate_sample(SAMPLE_SEED, 0).image()
    return prepare(loaded, ExplainSample([image], question), answer=answer)


def _demo(loaded: Any) -> Prepared:
    """A demo sample with the model's own answer."""
    from explainers.demo.samples import generate_sample

    sample = generate_sample(SAMPLE_SEED, 0)
    return prepare(loaded, ExplainSample([sample.image()], sample.text, id=sample.id))


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


def lvlm_interpret(prepared: Prepared) -> list[torch.Tensor]:
    """LVLM-Interpret's relevancy, rebuilt on this model: per generated token, its row of ``R - I``.

    Step-by-step decoding with the KV cache and gradients on; hooks keep each step's attention
    weights with ``retain_grad``. For step t: ``logits_t.backward(one_hot)`` (all parameter
    gradients too, as ``.backward`` does), then ``A_bar`` per layer from the step's own rows and
    the first step's prompt matrices (the KV-cache approximation), padded to full ``n_t x n_t``
    matrices, and ``R += A_bar @ R`` over them (``handle_self_attention_image``).
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
        rows.append((R - eye)[-1].cpu())
    model.zero_grad(set_to_none=True)
    return rows


# --- measuring ---------------------------------------------------------------------------------------


def interleaved(fns: dict[str, Callable[[], Any]], repeat: int, warmup: int,
                kept: dict[str, Any]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of each function per round, run in turn (A B C A B C ...).

    CPU seconds (the process's, all threads) are reported beside wall time because a shared
    machine's load changes wall time by several times within a run. ``kept`` gets each
    function's last result.
    """
    for _ in range(warmup):
        for name, fn in fns.items():
            kept[name] = fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            gc.collect()
            start, start_cpu = time.perf_counter(), time.process_time()
            kept[name] = fn()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    return wall, cpu


def _ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def _rows(label: str, prepared: Prepared, repeat: int, warmup: int, with_lvlm: bool) -> list[BenchRow]:
    fns: dict[str, Callable[[], Any]] = {"ours": lambda: ours(prepared), "floor": lambda: floor(prepared)}
    if with_lvlm:
        fns["lvlm_interpret"] = lambda: lvlm_interpret(prepared)
    kept: dict[str, Any] = {}
    wall, cpu = interleaved(fns, repeat, warmup, kept)
    shape = {"answer_tokens": len(prepared.answer.token_ids), "seq_len": prepared.seq_len,
             "image_tokens": int(prepared.image_positions.numel()), "target": TARGET, "repeat": repeat,
             "warmup": warmup, "threads": torch.get_num_threads(),
             **{f"seconds_{name}": statistics.median(t) for name, t in wall.items()},
             **{f"cpu_seconds_{name}": statistics.median(t) for name, t in cpu.items()}}
    out = [BenchRow(GROUP, "time: relevancy for all answer tokens / (1 forward + 1 backward per token)",
                    _ratio(wall, "ours", "floor"), FLOOR_TARGET, label,
                    {**shape, "cpu_time_ratio": _ratio(cpu, "ours", "floor")})]
    if with_lvlm:
        theirs, mine = kept["lvlm_interpret"][0], kept["ours"].decoder[0]
        # Both are exact for the first answer token (nothing cached yet): their rows must agree.
        check = {"first_token_max_abs_difference": float((theirs - mine[: theirs.numel()]).abs().max()),
                 "first_token_row_max": float(mine.abs().max())}
        out.append(BenchRow(GROUP, "speed-up: LVLM-Interpret's retained generation graph / ours",
                            _ratio(wall, "lvlm_interpret", "ours"), LVLM_TARGET, label,
                            {**shape, "cpu_time_ratio": _ratio(cpu, "lvlm_interpret", "ours"), **check}))
    return out


def cases(ctx: BenchContext) -> list[BenchRow]:
    rows: list[BenchRow] = []
    if "demo" in ctx.models:
        rows += _rows("demo", _demo(ctx.models["demo"]), repeat=max(ctx.repeat, 1), warmup=1, with_lvlm=False)
    tokens = QUICK_ANSWER_TOKENS if ctx.quick else ANSWER_TOKENS
    with tempfile.TemporaryDirectory(prefix="xmllm-bench-") as scratch:
        loaded = large_model(ctx, scratch)
        # Each run here is T backward passes through ~900 tokens: one interleaved round keeps
        # the case near a minute, after a one-token warm-up of all three paths on the same
        # model; CPU-time ratios in the details are steadier than wall ratios on a shared machine.
        _rows(LARGE, _forced(loaded, LONG_QUESTION, 1), repeat=1, warmup=0, with_lvlm=True)
        rows += _rows(LARGE, _forced(loaded, LONG_QUESTION, tokens), repeat=1, warmup=0, with_lvlm=True)
    return rows
