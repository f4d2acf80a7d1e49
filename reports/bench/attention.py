"""Attention capture against plain generation and against LVLM-Interpret's way of keeping attention.

Two figures per model, each measured side by side in this run:

* time of the model's eager greedy ``generate`` with our capture hooks, over the same
  ``generate`` without them (same inputs, same number of new tokens): target ``<= 1.3``;
* bytes our capture retains against ``generate(output_attentions=True)``'s per-step tensors,
  which LVLM-Interpret keeps whole (decoder attentions only on both sides; no target).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from explainers.capture import AttentionRecorder, eager_attention, full_attention_bytes

from . import BenchContext, BenchRow, paired_ratio
from .models import ANSWER_TOKENS, LONG_QUESTION, build_llava_576

GROUP = "attention.capture"
LARGE = "llava-576"
TIME_TARGET = "<= 1.3"
SAMPLE_SEED = 0


def _large_model(ctx: BenchContext, scratch: str) -> Any:
    """The 576-image-token model from the context, or built in ``scratch`` and loaded (eager attention)."""
    if LARGE in ctx.models:
        return ctx.models[LARGE]
    from explainers.models import load_model

    return load_model(build_llava_576(Path(scratch) / LARGE), eager_attention=True)


def _inputs(loaded: Any, question: str) -> Any:
    from explainers.demo.samples import generate_sample

    image = generate_sample(SAMPLE_SEED, 0).image()
    inputs, _ = loaded.adapter.build_inputs([image], question)
    inputs = inputs.to(loaded.device)
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    return inputs


def _cases_for(label: str, loaded: Any, question: str, forced: int | None, ctx: BenchContext) -> list[BenchRow]:
    model = loaded.model
    inputs = _inputs(loaded, question)
    prompt_len = int(inputs["input_ids"].shape[-1])
    limit = forced or model.generation_config.max_new_tokens or ANSWER_TOKENS
    generation: dict[str, Any] = {"max_new_tokens": limit, "do_sample": False}
    if forced:
        generation["min_new_tokens"] = forced
    kept: dict[str, Any] = {}
    cpu: dict[str, list[float]] = {"capture": [], "plain": []}

    @torch.no_grad()
    def with_capture() -> None:
        start = time.process_time()
        layouts = loaded.adapter.image_layouts(inputs)
        images = torch.cat([l.all_positions for l in layouts])
        recorder = AttentionRecorder(loaded, images, loaded.adapter.text_positions(inputs))
        with eager_attention(model), recorder:
            out = model.generate(**inputs, **generation)
        kept["record"] = recorder.generated(int(out.shape[-1]) - prompt_len)
        kept["hook_seconds"] = recorder.hook_seconds
        cpu["capture"].append(time.process_time() - start)

    @torch.no_grad()
    def plain() -> None:
        start = time.process_time()
        with eager_attention(model):
            kept["plain"] = model.generate(**inputs, **generation)
        cpu["plain"].append(time.process_time() - start)

    # LVLM-Interpret's way first: it measures the full tensors and warms both paths up.
    with eager_attention(model), torch.no_grad():
        full = model.generate(**inputs, **generation, output_attentions=True, return_dict_in_generate=True)
    theirs = full_attention_bytes(full.attentions)
    del full
    repeat = 1 if ctx.quick else ctx.repeat
    ratio, seconds_capture, seconds_plain = paired_ratio(with_capture, plain, repeat=repeat, warmup=0)
    record = kept["record"]
    new_tokens = int(record.rows.shape[0])
    if new_tokens != int(kept["plain"].shape[-1]) - prompt_len:
        raise RuntimeError(f"{label}: the captured and plain runs generated different lengths")
    ours = record.nbytes()
    shape = {"prompt_tokens": prompt_len, "new_tokens": new_tokens, "layers": record.num_layers,
             "heads": record.num_heads}
    return [
        BenchRow(GROUP, "time: generate with capture / plain eager generate", ratio, TIME_TARGET, label,
                 {**shape, "seconds_capture": seconds_capture, "seconds_plain": seconds_plain, "repeat": repeat,
                  "seconds_in_hooks_last_run": kept["hook_seconds"],
                  "cpu_time_ratio": statistics.median(a / b for a, b in zip(cpu["capture"], cpu["plain"])),
                  "note": "cpu_time_ratio (process CPU seconds) is robust to other processes sharing the CPU"}),
        BenchRow(GROUP, "retained bytes: all steps' output_attentions / our capture", theirs / ours, None, label,
                 {**shape, "bytes_full_attentions": theirs, "bytes_capture": ours,
                  "kept_by_capture": "answer rows (T x layers x heads x seq) + 4 prompt block means per layer/head"}),
    ]


def cases(ctx: BenchContext) -> list[BenchRow]:
    rows: list[BenchRow] = []
    if "demo" in ctx.models:
        from explainers.demo.samples import generate_sample

        rows += _cases_for("demo", ctx.models["demo"], generate_sample(SAMPLE_SEED, 0).text, None, ctx)
    with tempfile.TemporaryDirectory(prefix="xmllm-bench-") as scratch:
        rows += _cases_for(LARGE, _large_model(ctx, scratch), LONG_QUESTION, ANSWER_TOKENS, ctx)
    return rows
