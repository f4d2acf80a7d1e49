"""Every registered sample-level explainer against a plain greedy ``generate`` of the same answer.

On the model chosen with ``--model`` (the model as loaded for explaining: eager attention), for
the bench sample and the model's own answer of T tokens: each explainer's ``explain`` on the
prepared sample (the answer already generated) over ``model.generate(prompt, max_new_tokens=T,
do_sample=False)``, which produces the same T tokens. Two ratios per explainer, no targets:

* time: interleaved rounds (explainer, generate, explainer, generate ...), median of the ratios;
* peak memory: the most tensor bytes each held at once, in runs of their own
  (:mod:`xmllm.bench.memory`).

Explainers that need something besides the sample get it from :data:`NEED_INPUTS`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from xmllm.explainers.registry import Need, registered, sample_level_ids

from xmllm.errors import XmllmError
from . import BenchContext, BenchRow, interleaved
from .memory import peak_memory
from .models import MAIN, demo_sample, own_prepared, prompt_inputs

TIME = "time: explain / plain greedy generate of the same answer"
MEMORY = "peak memory: explain / plain greedy generate of the same answer"
SEED = 0
"""Seed set before every explain call, as ``xmllm explain`` does (noise baselines, sampling)."""

NEED_INPUTS: dict[Need, Callable[[Any], dict[str, Any]]] = {
    # Two checkpoints: the model against itself measures the comparison without loading another.
    Need.CHECKPOINTS: lambda loaded: {"other": loaded},
}
"""Parameters an explainer gets for what it needs beyond the sample (the bench sample carries
its ground truth and a counterfactual partner for the others)."""


def groups() -> list[str]:
    """Every sample-level explainer id: ``--only`` picks among them."""
    return sample_level_ids()


def _params(cls: type, loaded: Any) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for need in sorted(cls.needs, key=lambda n: n.value):
        if need in NEED_INPUTS:
            params.update(NEED_INPUTS[need](loaded))
    return params


def _greedy(loaded: Any, tokens: int) -> Callable[[], torch.Tensor]:
    """Plain greedy generation of ``tokens`` new tokens from the bench sample's prompt."""
    sample = demo_sample()
    inputs = prompt_inputs(loaded, sample.images, sample.question)

    @torch.inference_mode()
    def generate() -> torch.Tensor:
        return loaded.model.generate(**inputs, max_new_tokens=tokens, do_sample=False)

    return generate


def _explain(cls: type, loaded: Any, prepared: Any, params: dict[str, Any]) -> Callable[[], Any]:
    def run() -> Any:
        torch.manual_seed(SEED)
        return cls().explain(loaded, prepared, **params)

    return run


def cases(ctx: BenchContext) -> list[BenchRow]:
    loaded = ctx.models.get(MAIN)
    ids = [eid for eid in groups() if ctx.selects(eid)]
    if loaded is None or not ids:
        return []
    prepared = own_prepared(loaded)
    tokens = len(prepared.answer.token_ids)
    generate = _greedy(loaded, tokens)
    generated, generate_peak = peak_memory(generate, loaded.device)
    prompt_len = int(prompt_inputs(loaded, prepared.sample.images, prepared.sample.question)["input_ids"].shape[-1])
    same = generated[0, prompt_len : prompt_len + tokens].tolist() == list(prepared.answer.token_ids)
    shared = {"answer_tokens": tokens, "seq_len": prepared.seq_len, "same_answer": same,
              "attention_kernel": str(loaded.model.config._attn_implementation), "device": str(loaded.device),
              "threads": torch.get_num_threads(), "memory_method": generate_peak.method}
    repeat = 1 if ctx.quick else ctx.repeat
    table = registered()
    rows: list[BenchRow] = []
    for eid in ids:
        ctx.tell(eid)
        cls = table[eid]
        params = _params(cls, loaded)
        explain = _explain(cls, loaded, prepared, params)
        details = {**shared, "params": sorted(params)}
        try:
            _, peak = peak_memory(explain, loaded.device)  # also the warm-up of the timed rounds
            timings = interleaved({"explain": explain, "generate": generate}, repeat=repeat, warmup=0)
        except (ValueError, RuntimeError, TypeError, XmllmError) as error:  # reported; the other rows still come
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            for metric in (TIME, MEMORY):
                rows.append(BenchRow(eid, metric, float("nan"), None, MAIN, {**details, "error": message}))
            continue
        details.update({"repeat": repeat, **timings.summary(),
                        "cpu_time_ratio": timings.cpu_ratio("explain", "generate")})
        rows.append(BenchRow(eid, TIME, timings.ratio("explain", "generate"), None, MAIN, details,
                             ours=timings.seconds("explain"), reference=timings.seconds("generate"), unit="s"))
        rows.append(BenchRow(eid, MEMORY, peak.bytes / max(generate_peak.bytes, 1), None, MAIN, details,
                             ours=float(peak.bytes), reference=float(generate_peak.bytes), unit="B"))
    return rows
