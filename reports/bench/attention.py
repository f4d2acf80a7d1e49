"""Attention capture against plain generation and against LVLM-Interpret's way of keeping attention.

Two figures per model, each measured side by side in this run:

* time of the model's eager greedy ``generate`` with our capture hooks, over the same
  ``generate`` without them (same inputs, same number of new tokens): target ``<= 1.3``;
* bytes our capture retains against ``generate(output_attentions=True)``'s per-step tensors,
  which LVLM-Interpret keeps whole (decoder attentions only on both sides; no target).
"""
from __future__ import annotations

from typing import Any

import torch

from xmllm.explainers.capture import AttentionRecorder, eager_attention, full_attention_bytes

from . import BenchContext, BenchRow, interleaved
from .models import ANSWER_TOKENS, LARGE, LONG_QUESTION, MAIN, answer_tokens, demo_sample, prompt_inputs

GROUP = "attention.capture"
TIME_TARGET = "<= 1.3"


def _cases_for(label: str, loaded: Any, question: str, forced: int | None, ctx: BenchContext) -> list[BenchRow]:
    model = loaded.model
    inputs = prompt_inputs(loaded, demo_sample().images, question)
    prompt_len = int(inputs["input_ids"].shape[-1])
    limit = forced or model.generation_config.max_new_tokens or ANSWER_TOKENS
    generation: dict[str, Any] = {"max_new_tokens": limit, "do_sample": False}
    if forced:
        generation["min_new_tokens"] = forced
    kept: dict[str, Any] = {}

    @torch.no_grad()
    def with_capture() -> None:
        layouts = loaded.adapter.image_layouts(inputs)
        images = torch.cat([l.all_positions for l in layouts])
        recorder = AttentionRecorder(loaded, images, loaded.adapter.text_positions(inputs))
        with eager_attention(model), recorder:
            out = model.generate(**inputs, **generation)
        kept["record"] = recorder.generated(int(out.shape[-1]) - prompt_len)
        kept["hook_seconds"] = recorder.hook_seconds

    @torch.no_grad()
    def plain() -> torch.Tensor:
        with eager_attention(model):
            return model.generate(**inputs, **generation)

    # LVLM-Interpret's way first: it measures the full tensors and warms both paths up.
    with eager_attention(model), torch.no_grad():
        full = model.generate(**inputs, **generation, output_attentions=True, return_dict_in_generate=True)
    theirs = full_attention_bytes(full.attentions)
    del full
    repeat = 1 if ctx.quick else ctx.repeat
    timings = interleaved({"capture": with_capture, "plain": plain}, repeat=repeat, warmup=0, kept=kept)
    record = kept["record"]
    new_tokens = int(record.rows.shape[0])
    if new_tokens != int(kept["plain"].shape[-1]) - prompt_len:
        raise RuntimeError(f"{label}: the captured and plain runs generated different lengths")
    ours = record.nbytes()
    shape = {"prompt_tokens": prompt_len, "new_tokens": new_tokens, "layers": record.num_layers,
             "heads": record.num_heads}
    return [
        BenchRow(GROUP, "time: generate with capture / plain eager generate", timings.ratio("capture", "plain"),
                 TIME_TARGET, label,
                 {**shape, **timings.summary(), "repeat": repeat, "seconds_in_hooks_last_run": kept["hook_seconds"],
                  "cpu_time_ratio": timings.cpu_ratio("capture", "plain"),
                  "note": "cpu_time_ratio (process CPU seconds) is robust to other processes sharing the CPU"},
                 ours=timings.seconds("capture"), reference=timings.seconds("plain"), unit="s"),
        BenchRow(GROUP, "retained bytes: all steps' output_attentions / our capture", theirs / ours, None, label,
                 {**shape, "bytes_full_attentions": theirs, "bytes_capture": ours,
                  "kept_by_capture": "answer rows (T x layers x heads x seq) + 4 prompt block means per layer/head"},
                 ours=float(ours), reference=float(theirs), unit="B"),
    ]


def cases(ctx: BenchContext) -> list[BenchRow]:
    rows: list[BenchRow] = []
    if MAIN in ctx.models:
        ctx.tell(f"{GROUP} on {MAIN}")
        rows += _cases_for(MAIN, ctx.models[MAIN], demo_sample().question, None, ctx)
    if LARGE in ctx.models:
        ctx.tell(f"{GROUP} on {LARGE}")
        rows += _cases_for(LARGE, ctx.models[LARGE], LONG_QUESTION, answer_tokens(ctx), ctx)
    return rows
