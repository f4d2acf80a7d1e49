"""``xmllm bench --scale``: every sample-level explainer's peak memory on real-width models.

For each published architecture of :mod:`xmllm.bench.scale_configs` (LLaVA-1.5-7B and -13B,
LLaVA-NeXT-7B, Qwen2-VL-7B, Idefics3-8B, Qwen2.5-VL-7B, InternVL3.5-8B, LLaVA-OneVision-7B) and each
sample-level explainer (and the recomputed run, ``recompute=True``, of each one that differentiates,
:data:`RECOMPUTED`), with its cost in forward-equivalents: the peak tensor memory
of one explanation (bfloat16, one image, a 32-token forced answer, eager attention as ``xmllm
explain`` loads a model) with the decoder cut to 1, 2 and 4 blocks and the vision tower to
:data:`VISION_BASE` blocks, plus one run with :data:`VISION_STEP` vision blocks; a least-squares
line in the number of decoder blocks (its residual says how straight it is) and the vision step's
slope project the peak to the published depth; the weights (every parameter in bfloat16) come on
top. The table compares that with 24, 48 and 80 GB GPUs (GiB, as GPU memory is counted).

Each explanation runs under the memory budget the smallest fitting GPU would give it
(:func:`gpu_budget`, the same rule :func:`xmllm.explainers.memory.default_budget` applies on a
real GPU) and with the per-copy estimates of the full-depth model
(:func:`xmllm.explainers.memory.planning`), so it batches as it would on that GPU.

On a CPU the measurement is the free-arithmetic one of :mod:`xmllm.bench.free_compute`: real
shapes, real allocations, no matrix products (the test suite checks it equals the real-arithmetic
count exactly, every explainer, four families). With ``--device cuda`` the models get random
weights on the GPU and every number is ``torch.cuda.max_memory_allocated`` of real runs.

Where memory does not depend on a parameter, the measurement uses a cheaper value (fewer
occlusion windows, IG path points or token-drop steps than the defaults, but never fewer copies
per forward than the defaults batch); each explainer's
:meth:`~xmllm.explainers.registry.Explainer.scale_plan` says which, and the table lists it.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from xmllm.explainers.answering import Answer
from xmllm.explainers.memory import (
    CUDA_FREE_SHARE,
    CUDA_RESERVE,
    memory_budget,
    planning,
)
from xmllm.explainers.prepared import ExplainSample, Prepared, prepare
from xmllm.explainers.registry import get_explainer, registered, sample_level_ids
from xmllm.explainers.recompute import recomputes
from xmllm.explainers.scaleplan import ScalePlan, recomputed

from .scale_placement import Weights, place, render_placed, weights_of
from .scale_configs import (
    CONFIGS,
    ScaleConfig,
    bench_image,
    build,
    build_processor,
    parameter_count,
)

GIB = 1 << 30
DEPTHS: tuple[int, ...] = (1, 2, 4)
"""Decoder blocks the models are cut to; the line through these is projected to the full depth."""
VISION_BASE = 2
"""Vision blocks of every measured model: the fewest for which every family's decoder reads a
block's output (LLaVA reads the second-to-last hidden state)."""
VISION_STEP = 3
"""Vision blocks of the one extra run (at one decoder block) that gives the vision tower's slope."""
GPUS: tuple[int, ...] = (24, 48, 80)
"""GPU sizes in GiB the projections are compared with."""
CUDA_CONTEXT = 512 << 20
"""What a CUDA context and the kernels' libraries take before any tensor (about 0.3-0.6 GiB)."""
DTYPE = torch.bfloat16
ANSWER_TOKENS = 32
ANSWER_WORDS = "the red circle is left of the blue square and the green triangle is above it"
FREE = "tensor storages of real-shaped operators, matrix products free (xmllm.bench.free_compute)"
CUDA = "torch.cuda.max_memory_allocated, real arithmetic, random weights"


# --- budgets ------------------------------------------------------------------------------------------


def gpu_budget(gpu_gib: int, weights: int) -> int:
    """What :func:`~xmllm.explainers.memory.default_budget` gives on a GPU of ``gpu_gib`` GiB that
    holds ``weights`` bytes of weights and a CUDA context."""
    free = gpu_gib * GIB - weights - CUDA_CONTEXT
    return max(1, int(free * CUDA_FREE_SHARE) - CUDA_RESERVE)


def target_gpu(weights: int) -> int:
    """The smallest GPU of :data:`GPUS` whose budget after the weights is at least 2 GiB."""
    for size in GPUS:
        if gpu_budget(size, weights) >= 2 * GIB:
            return size
    return GPUS[-1]


class _Stop(Exception):
    """Raised by :class:`Costs` once the planned number of forwards has run."""


class Costs:
    """Counts copy-forwards and copy-backwards through the first decoder block, in units of the
    explained sequence (a batch of 8 full copies is 8; a 1-token decode step is 1/seq)."""

    def __init__(self, prep: Prepared, stop_batch: int | None = None, stop_backwards: int | None = None) -> None:
        self.prep = prep
        self.block = prep.adapter.decoder_layers()[0]
        self.forward_tokens = 0
        self.backward_tokens = 0
        self.backwards = 0
        self.recomputed = False
        """Whether the blocks ran recomputed (``recompute="auto"`` switched it on under the budget)."""
        self.stop_batch = stop_batch
        self.stop_backwards = stop_backwards
        self.done = False

    def _forward(self, _module: Any, _args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if not torch.is_tensor(hidden):
            return
        self.forward_tokens += hidden.numel() // hidden.shape[-1]
        self.recomputed = self.recomputed or recomputes(_module)
        if self.stop_batch is not None and hidden.shape[0] >= self.stop_batch:
            self.done = True  # the next forward repeats this batch's sizes: stop there
        if hidden.requires_grad:
            hidden.register_hook(self._backward)

    def _backward(self, grad: torch.Tensor) -> None:
        if self.stop_backwards is not None and self.backwards >= self.stop_backwards:
            raise _Stop(f"stopped in backward pass {self.backwards + 1}")
        self.backwards += 1
        self.backward_tokens += grad.numel() // grad.shape[-1]

    def _count(self, _module: Any, _args: Any) -> None:
        if self.done:
            raise _Stop(f"stopped after the first forward of {self.stop_batch} copies")

    @contextlib.contextmanager
    def installed(self) -> Iterator[Costs]:
        handles = [self.block.register_forward_pre_hook(self._count), self.block.register_forward_hook(self._forward)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def summary(self) -> dict[str, float]:
        seq = self.prep.seq_len
        forwards, backwards = self.forward_tokens / seq, self.backward_tokens / seq
        out = {"forwards": round(forwards, 2), "backwards": round(backwards, 2),
               "forward_equivalents": round(forwards + 2 * backwards, 2)}
        return {**out, "recomputed": True} if self.recomputed else out


# --- run keys: an explainer, or its recomputed run -------------------------------------------------------

RECOMPUTED = "@recompute"
"""Suffix of the run key of an explainer's recomputed run (``gradient.saliency@recompute``): the same
explanation with ``recompute=True`` (every decoder and vision block recomputed in the backward,
:mod:`xmllm.explainers.recompute`), for every explainer that declares the parameter."""


def differentiates(eid: str) -> bool:
    """Whether ``eid`` declares ``recompute`` (it runs a backward pass that can recompute its blocks)."""
    return "recompute" in registered()[eid].Params.names()


def run_keys(ids: Sequence[str], recompute: bool = True) -> list[str]:
    """Each explainer's run key, followed by its recomputed run's where it differentiates."""
    return [key for eid in ids for key in (eid, *([eid + RECOMPUTED] if recompute and differentiates(eid) else []))]


def selected(key: str, only: str | None) -> bool:
    """Whether ``--only`` picks the run key ``key``: it contains one of the comma-separated
    substrings (``gradient``, ``@recompute``, ``relevancy.chefer@recompute,lens``)."""
    return not only or any(part.strip() in key for part in only.split(",") if part.strip())


def split_key(key: str) -> tuple[str, dict[str, Any]]:
    """The explainer of a run key and the parameters its variant adds."""
    if key.endswith(RECOMPUTED):
        return key[: -len(RECOMPUTED)], {"recompute": True}
    return key, {}


# --- one measurement --------------------------------------------------------------------------------------


def forced(loaded: Any, image: Any, tokens: int = ANSWER_TOKENS) -> Prepared:
    """The bench question on ``image`` with a forced answer of ``tokens`` word tokens, carrying the
    demo sample's ground truth (the counterfactual and patching explainers edit the scene)."""
    from .models import demo_sample

    base = demo_sample()
    text = " ".join([ANSWER_WORDS] * (tokens // len(ANSWER_WORDS.split()) + 1))
    ids = loaded.adapter.tokenize_answer(text)[:tokens]
    tokenizer = loaded.processor.tokenizer
    answer = Answer(tokenizer.decode(ids), tuple(ids), tuple(tokenizer.convert_ids_to_tokens(ids)),
                    tuple(0.0 for _ in ids))
    sample = ExplainSample([image], base.question, id=base.id, expected=base.expected, mask=base.mask,
                           extra=dict(base.extra))
    return prepare(loaded, sample, answer=answer)


KNOWN_AFTER_FORWARDS = ("nothing to restore",)
"""Errors raised after every forward on free arithmetic (patching's clean and corrupted runs give the
same logits when no product depends on the input): the peak still holds."""


@dataclass
class Measured:
    peak: int | None
    seconds: float
    costs: dict[str, float]
    error: str | None = None
    stopped: bool = False


def measure_one(eid: str, prep: Prepared, params: dict[str, Any], device: torch.device,
                stop_batch: int | None = None, stop_backwards: int | None = None) -> Measured:
    """One explanation's peak tensor bytes (free arithmetic on a CPU, the allocator on CUDA); with
    ``stop_batch``, stopped after its first forward of that many copies; with ``stop_backwards``,
    once that many backward passes have run.

    A recomputed block's forward runs inside the backward, where free arithmetic answers functional
    operators unwritten; checkpointing refuses recomputed tensors whose metadata differ from the
    saved ones, so :class:`~xmllm.bench.free_compute.FreeCompute` runs the recomputation's operators as a
    forward's (free products, real elementwise ones; the peak counts the same bytes as real arithmetic,
    tested)."""
    from .free_compute import collector_paused, measure

    cls = registered()[eid]
    costs = Costs(prep, stop_batch, stop_backwards)
    start = time.perf_counter()

    def run() -> Any:
        torch.manual_seed(0)
        with costs.installed():
            return cls().explain(prep.loaded, prep, **params)

    if device.type == "cuda":  # the allocator's own count (what xmllm.bench.memory.peak_memory reads)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with collector_paused():
            try:
                result = run()
            except Exception as error:  # noqa: BLE001 - a stop, or an error reported in the table
                result = error
        torch.cuda.synchronize(device)
        value = torch.cuda.max_memory_allocated(device) - before
    else:
        result, value = measure(run)
    seconds = time.perf_counter() - start
    stopped = isinstance(result, _Stop)
    error = None
    if isinstance(result, Exception) and not stopped:
        message = str(result).splitlines()[0] if str(result) else type(result).__name__
        if not any(known in message for known in KNOWN_AFTER_FORWARDS):
            error, value = f"{type(result).__name__}: {message}", None
    return Measured(value, round(seconds, 2), costs.summary(), error, stopped)


# --- the fit ------------------------------------------------------------------------------------------


def fit(points: Sequence[tuple[float, float]]) -> dict[str, float]:
    """Least squares ``peak = intercept + slope * layers``; residual: root-mean-square and largest |r|."""
    n = len(points)
    xs, ys = [float(x) for x, _ in points], [float(y) for _, y in points]
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    intercept = my - slope * mx
    residuals = [y - (intercept + slope * x) for x, y in zip(xs, ys)]
    return {"intercept": intercept, "slope": slope,
            "residual_rms": math.sqrt(sum(r * r for r in residuals) / n),
            "residual_max": max(abs(r) for r in residuals)}


def project(line: dict[str, float], layers: int) -> float:
    return line["intercept"] + line["slope"] * layers


# --- a whole configuration -------------------------------------------------------------------------------


@dataclass
class Model:
    """One architecture's fixed numbers for the run."""

    config: ScaleConfig
    processor: Any
    parameters: int
    gpu: int
    budget: int

    @property
    def weights(self) -> int:
        return self.parameters * torch.empty((), dtype=DTYPE).element_size()


def describe(config: ScaleConfig) -> Model:
    processor = build_processor(config)
    parameters = parameter_count(config, processor)
    weights = parameters * torch.empty((), dtype=DTYPE).element_size()
    gpu = target_gpu(weights)
    return Model(config, processor, parameters, gpu, gpu_budget(gpu, weights))


def _prep_for(prep: Prepared, chosen: ScalePlan) -> Prepared:
    if not chosen.no_truth:
        return prep
    from dataclasses import replace

    return replace(prep, sample=replace(prep.sample, extra={}, mask=None))


def measure_points(builder: Callable[[int, int], Any], image: Any, ids: Sequence[str],
                   points: Sequence[tuple[int, int]], full: tuple[int, int], budget: int | None,
                   device: torch.device, tell: Callable[[str], None] | None = None, label: str = "",
                   answer_tokens: int = ANSWER_TOKENS) -> tuple[dict[str, dict[tuple[int, int], Measured]], dict[str, ScalePlan],
                              dict[str, Measured], dict[str, Any]]:
    """Every run key (:func:`run_keys`) at every (decoder, vision) point of the models ``builder`` makes, chunking as
    the ``full``-depth model would on a GPU under ``budget`` (None: the device's default). A batching
    explainer runs at its larger trial batch at every point and at its smaller one at the first point
    (the per-copy bytes); returns the runs, the plans, those smaller-batch runs, and the sizes."""
    runs: dict[str, dict[tuple[int, int], Measured]] = {eid: {} for eid in ids}
    plans: dict[str, ScalePlan] = {}
    small: dict[str, Measured] = {}
    info: dict[str, Any] = {}
    for layers, vision_layers in points:
        loaded = builder(layers, vision_layers)
        prep = forced(loaded, image, answer_tokens)
        info.update(seq_len=prep.seq_len, image_tokens=int(prep.image_positions.numel()),
                    answer_tokens=len(prep.answer.token_ids))
        with memory_budget(budget), planning(*full, device="cuda"):
            for key in ids:
                eid, extra = split_key(key)
                if tell is not None:
                    tell(f"{label} {layers}+{vision_layers} {key}")
                if key not in plans:
                    plans[key] = get_explainer(eid).scale_plan(prep, full[0])
                chosen = plans[key]
                sample = _prep_for(prep, chosen)
                trial = max(chosen.trials) if chosen.trials else None
                params = {**(chosen.at(trial) if trial else chosen.params), **extra}
                runs[key][(layers, vision_layers)] = measure_one(eid, sample, params, device, trial,
                                                                 chosen.stop_backwards)
                if len(chosen.trials) > 1 and (layers, vision_layers) == points[0]:
                    low = min(chosen.trials)
                    small[key] = measure_one(eid, sample, {**chosen.at(low), **extra}, device, low)
        del loaded, prep
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return runs, plans, small, info


def measure_config(model: Model, ids: Sequence[str], device: torch.device, depths: Sequence[int] = DEPTHS,
                   vision: tuple[int, int] = (VISION_BASE, VISION_STEP),
                   tell: Callable[[str], None] | None = None, image: Any = None,
                   answer_tokens: int = ANSWER_TOKENS) -> list[dict[str, Any]]:
    """Every run key in ``ids`` (:func:`run_keys`) on ``model`` at each depth, fitted and projected: one
    row each (``image``: the bench image by default; ``answer_tokens``: the forced answer's length)."""
    config = model.config
    full = (config.decoder_layers, config.vision_layers)
    base, step = vision
    points = [(layers, base) for layers in depths] + [(depths[0], step)]
    values = "random" if device.type == "cuda" else "free"

    def builder(layers: int, vision_layers: int) -> Any:
        return build(config, layers, vision_layers, values=values, device=device, dtype=DTYPE,
                     processor=model.processor)

    runs, plans, small, info = measure_points(builder, bench_image(config) if image is None else image, ids, points,
                                              full, model.budget, device, tell, config.name, answer_tokens)
    rows = {key: _row(model, key, plans[key], runs[key], small.get(key), points, full, info) for key in ids}
    for key, row in rows.items():  # a recomputed run costs its kept run's forwards plus one per backward
        eid, extra = split_key(key)
        if extra:
            row["costs"] = recomputed(rows[eid]["kept_costs"] if eid in rows else row["kept_costs"])
    return list(rows.values())


def projection(runs: dict[tuple[int, int], Measured], points: Sequence[tuple[int, int]], chosen: ScalePlan,
               small: Measured | None, full: tuple[int, int], vision: bool = True) -> dict[str, Any]:
    """The fit through the decoder points (``points`` minus the last, the vision step, when ``vision``)
    and the projected activation bytes at ``full`` depth. For a batching explainer every point's
    peak is first carried from the larger trial batch to the batch the defaults use, by the per-copy
    bytes between the two trial batches at the first point (listed under ``trials`` in the row).

    The projection follows the line through the two deepest points (``settled``), the marginal
    cost of a block once the peak has found its place: with one block a forward's peak can sit in
    the attention and with two in the MLP, so the line through all three (``fit``, whose residual
    says how bent they are) tilts by that move and, carried to 32 blocks, overstates a batched
    forward without a graph several times (measured on LLaVA-NeXT-7B occlusion: 1,426, 1,429 and
    1,431 MiB at 4, 6 and 8 blocks, where the 1-2-4 line climbs 190 MiB a block). Where memory
    grows by the block (backward passes) both lines agree."""
    base_points = list(points[:-1] if vision else points)
    shift, out = 0.0, {}
    if len(chosen.trials) > 1 and small is not None and small.peak is not None and chosen.batch:
        low, high = min(chosen.trials), max(chosen.trials)
        per_copy = (runs[points[0]].peak - small.peak) / (high - low)
        shift = max(0.0, per_copy) * (chosen.batch - high)
        out.update(per_copy_bytes=per_copy, batch=chosen.batch, trials=list(chosen.trials))
    elif chosen.batch:
        out.update(batch=chosen.batch, trials=list(chosen.trials))
    peaks = [(layers, runs[(layers, v)].peak + shift) for layers, v in base_points]
    line = fit(peaks)
    settled = fit(peaks[-2:])
    step = runs[points[-1]].peak - runs[points[0]].peak if vision else 0
    # one more vision block cannot lower the peak: a step below zero says the one-block point's peak
    # sat elsewhere (measured: integrated gradients, recomputed, on Idefics3-8B), so it adds nothing
    vision_slope = max(0.0, step)
    activations = project(settled, full[0]) + vision_slope * (full[1] - points[0][1])
    return {**out, "fit": line, "settled": {"intercept": settled["intercept"], "slope": settled["slope"]},
            "vision_slope_bytes": vision_slope, "vision_step_bytes": step, "projected_activation_bytes": activations}


def fitted(total: float, gpus: Sequence[int]) -> dict[str, Any]:
    """A row's projected bytes and which of ``gpus`` (GiB) they fit: every size, and the smallest."""
    return {"projected_bytes": total, "fits": {str(g): total <= g * GIB for g in gpus},
            "smallest_gpu": next((g for g in gpus if total <= g * GIB), None)}


def _row(model: Model, key: str, chosen: ScalePlan, runs: dict[tuple[int, int], Measured], small: Measured | None,
         points: list[tuple[int, int]], full: tuple[int, int], info: dict[str, Any]) -> dict[str, Any]:
    measured = [*runs.values(), *([small] if small is not None else [])]
    errors = sorted({m.error for m in measured if m.error})
    eid, extra = split_key(key)
    row: dict[str, Any] = {
        "config": model.config.name, "explainer": eid, "run": "recomputed" if extra else "default",
        "key": key, "note": chosen.note, "gpu_budget_gib": model.gpu,
        "budget_bytes": model.budget, "weights_bytes": model.weights, "parameters": model.parameters,
        "peaks": {f"{layers}+{vision}": runs[(layers, vision)].peak for layers, vision in points},
        "seconds": round(sum(m.seconds for m in measured), 1),
        "kept_costs": chosen.cost or runs[points[-2]].costs, "stopped": any(m.stopped for m in measured), **info,
    }
    # recompute="auto" switches recomputation on where the kept backward does not fit the budget: the
    # default run then pays the recomputed run's extra forwards too
    row["auto_recompute"] = not extra and any(m.costs.get("recomputed") for m in measured)
    row["costs"] = {**recomputed(row["kept_costs"]), "recomputed": True} if row["auto_recompute"] else row["kept_costs"]
    if errors or any(m.peak is None for m in measured):
        row.update(error=errors[0] if errors else "no peak measured", projected_bytes=None, fits={})
        return row
    row.update(projection(runs, points, chosen, small, full))
    total = row["projected_activation_bytes"] + model.weights
    row.update(fitted(total, GPUS))
    return row


# --- the whole run ------------------------------------------------------------------------------------------


def run_scale(config_names: Sequence[str] | None, only: str | None, device: torch.device,
              tell: Callable[[str], None] | None = None, recompute: bool = True) -> dict[str, Any]:
    """The ``--scale`` report: rows per configuration and explainer (and, with ``recompute``, per
    differentiating explainer's recomputed run), with timing."""
    start = time.perf_counter()
    ids = [key for key in run_keys(sample_level_ids(), recompute) if selected(key, only)]
    configs = [c for c in CONFIGS if not config_names or c.name in config_names]
    rows: list[dict[str, Any]] = []
    models = {}
    for config in configs:
        model = describe(config)
        models[config.name] = {
            "source": config.source, "model_type": config.model_type, "parameters": model.parameters,
            "weights_bytes": model.weights, "decoder_layers": config.decoder_layers,
            "vision_layers": config.vision_layers, "image_size": list(config.image_size),
            "image_tokens_published": config.image_tokens, "note": config.note, "measured_on_gpu_gib": model.gpu,
            "budget_bytes": model.budget,
            "numbers": {"text": config.text, "vision": config.vision, "top": config.top,
                        "processor": config.processor},
            "weights_split": asdict(weights_of(config, model.processor, DTYPE)),
        }
        rows += measure_config(model, ids, device, tell=tell)
    report = {"device": str(device), "method": CUDA if device.type == "cuda" else FREE, "dtype": "bfloat16",
            "answer_tokens": ANSWER_TOKENS, "depths": list(DEPTHS), "vision_blocks": [VISION_BASE, VISION_STEP],
            "gpus_gib": list(GPUS), "models": models, "rows": rows,
            "seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads()}
    return {**report, "placed": placed(report)}


def placed(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The sharded and offloaded placements of the report's configs too large for one GPU
    (:mod:`xmllm.bench.scale_placement`), from its rows; reports merged from several runs get
    theirs again from here."""
    split = {name: Weights(**info["weights_split"]) for name, info in report["models"].items()
             if "weights_split" in info}
    return place(report, split, CUDA_CONTEXT, RECOMPUTED)


def _key(row: dict[str, Any]) -> str:
    return row.get("key", row["explainer"])


def _cost(row: dict[str, Any]) -> str:
    """A row's forward-equivalents as a table cell: ``x65``, ``x579+`` (a lower bound), ``x97*`` (a
    default run that recomputed its blocks by itself; a recomputed run is not marked)."""
    costs = row["costs"]
    value = costs.get("forward_equivalents")
    if value is None:
        return ""
    shown = f"{value:.0f}" if value >= 100 else f"{value:g}"
    return f"x{shown}{'+' if costs.get('lower_bound') else ''}{'*' if costs.get('recomputed') and row.get('run') != 'recomputed' else ''}"


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.1f}"


def render(report: dict[str, Any]) -> str:
    """The projected peaks as a table (GiB) against each GPU size, then the fits and notes."""
    configs = list(report["models"])
    keys = sorted({_key(r) for r in report["rows"]})
    by = {(r["config"], _key(r)): r for r in report["rows"]}
    lines = [f"xmllm bench --scale on {report['device']}: {report['method']}; bfloat16, one image, "
             f"a {report['answer_tokens']}-token forced answer; decoder cut to {report['depths']} blocks, "
             f"vision to {report['vision_blocks'][0]} (+1 for its slope); projected to the published depth "
             f"+ weights, in GiB, then the cost in forward-equivalents (forwards + 2 x backwards, + 1 forward a "
             f"backward when recomputed; '+': a lower bound; '*': the default run recomputed its blocks by itself, "
             f"recompute='auto' under the budget); {RECOMPUTED}: the run with recompute=True"]
    for name, info in report["models"].items():
        lines.append(f"  {name}: {info['source']}, {info['parameters'] / 1e9:.2f}B parameters "
                     f"({info['weights_bytes'] / GIB:.1f} GiB bf16), {info['decoder_layers']} + "
                     f"{info['vision_layers']} blocks; explained under the budget of a {info['measured_on_gpu_gib']} "
                     f"GB GPU ({info['budget_bytes'] / GIB:.1f} GiB)")
    header = ["explainer", *configs]
    table = []
    for key in keys:
        cells = [key]
        for name in configs:
            row = by.get((name, key))
            if row is None:
                cells.append("")
            elif row.get("projected_bytes") is None:
                cells.append("error")
            else:
                fits = row["fits"]
                mark = next((f"<={g}" for g in report["gpus_gib"] if fits.get(str(g))), ">80")
                cells.append(f"{_gib(row['projected_bytes'])} {mark} {_cost(row)}")
        table.append(cells)
    lines += ["", _table(header, table)]
    lines += ["", "per block, GiB: the projection's slope (2-4 blocks), the 1-2-4 line's slope and residual (rms / max), "
                  "the vision tower's slope:"]
    for row in report["rows"]:
        if row.get("fit"):
            f = row["fit"]
            lines.append(f"  {row['config']:14s} {_key(row):44s} slope {row['settled']['slope'] / GIB:7.3f}  "
                         f"line {f['slope'] / GIB:7.3f} rms {f['residual_rms'] / GIB:.4f} max {f['residual_max'] / GIB:.4f}  "
                         f"vision {row['vision_slope_bytes'] / GIB:7.3f}  fwd-eq {row['costs']['forward_equivalents']}")
        else:
            lines.append(f"  {row['config']:14s} {_key(row):44s} {row.get('error')}")
    notes = sorted({(r["explainer"], r["note"]) for r in report["rows"] if r["note"]})
    if notes:
        lines += ["", "measured with cheaper parameters where memory does not depend on them:"]
        lines += [f"  {eid}: {note}" for eid, note in notes]
    if report.get("placed"):
        title, header, table = render_placed(report["placed"])
        lines += ["", title, _table(header, table)]
    lines += ["", f"{len(report['rows'])} explanations x {len(report['depths']) + 1} depths in "
                  f"{report['seconds']:.0f} s ({report['threads']} threads)"]
    return "\n".join(lines)


SHARED = ("device", "method", "dtype", "answer_tokens", "depths", "vision_blocks", "gpus_gib")
"""What every merged report must agree on."""


def _clamped(row: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """A row of a report made before :func:`projection` clamped a vision step below zero, projected
    again without it (rows of later reports come back unchanged)."""
    step = row.get("vision_slope_bytes")
    if "vision_step_bytes" in row or step is None or step >= 0 or row.get("projected_bytes") is None:
        return row
    extra = report["models"][row["config"]]["vision_layers"] - report["vision_blocks"][0]
    activations = row["projected_activation_bytes"] - step * extra
    return {**row, "vision_slope_bytes": 0.0, "vision_step_bytes": step, "projected_activation_bytes": activations,
            **fitted(activations + row["weights_bytes"], report["gpus_gib"])}


def merge(reports: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One report from several runs' JSON (``--merge``: (name, report) pairs, e.g. each config run
    on its own): their configs and rows, a later run's row replacing an earlier one's of the same
    config and run key, placements derived again, seconds summed."""
    from xmllm.errors import XmllmError

    first_name, first = reports[0]
    models: dict[str, Any] = {}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for name, report in reports:
        missing = [f for f in (*SHARED, "models", "rows") if f not in report]
        if missing:
            raise XmllmError(f"--merge {name}: not an 'xmllm bench --scale --json' report (no {missing[0]!r})")
        differ = next((f for f in SHARED if report[f] != first[f]), None)
        if differ:
            raise XmllmError(f"--merge {name}: {differ} {report[differ]!r} differs from {first_name}'s {first[differ]!r}")
        models.update(report["models"])
        rows.update({(r["config"], _key(r)): _clamped(r, report) for r in report["rows"]})
    out = {**{f: first[f] for f in SHARED}, "models": models, "rows": list(rows.values()),
           "seconds": round(sum(r.get("seconds", 0.0) for _, r in reports), 1),
           "threads": first.get("threads"), "merged": [name for name, _ in reports]}
    return {**out, "placed": placed(out)}


def markdown(report: dict[str, Any]) -> str:
    """The table as Markdown (the README's): projected GiB per explainer run and config, "(48)" /
    "(80)" / "(>80)" where a 24 GB GPU is too small, and the first config's forward-equivalents."""
    configs = list(report["models"])
    by = {(r["config"], _key(r)): r for r in report["rows"]}
    keys = sorted({_key(r) for r in report["rows"]})
    lines = [f"| explainer | {' | '.join(configs)} | forward-equivalents ({configs[0]}) |",
             f"| --- |{' ---: |' * (len(configs) + 1)}"]
    for key in keys:
        cells = []
        for name in configs:
            row = by.get((name, key))
            if row is None or row.get("projected_bytes") is None:
                cells.append("" if row is None else "error")
                continue
            smallest = row.get("smallest_gpu")
            mark = "" if smallest == report["gpus_gib"][0] else f" ({smallest or '>' + str(report['gpus_gib'][-1])})"
            cells.append(f"{_gib(row['projected_bytes'])}{mark}")
        head = by.get((configs[0], key))
        cost = _cost(head).lstrip("x") if head else ""
        lines.append(f"| `{key}` | {' | '.join(cells)} | {cost} |")
    if report.get("placed"):
        lines += ["", "| config | explainer | largest shard, 2 x 24 GB | offloaded, one 24 GB | blocks on the GPU / "
                      "offloaded | bus transfer per explanation |", "| --- | --- | ---: | ---: | ---: | ---: |"]
        for p in report["placed"]:
            s, o = p["sharded"], p["offloaded"]
            lines.append(f"| {p['config']} | `{p['explainer']}` | {_gib(max(s['peaks']))}{'' if s['fits'] else ' (no)'} | "
                         f"{_gib(o['peak'])}{'' if o['fits'] else ' (no)'} | {o['resident_blocks']} / "
                         f"{o['offloaded_blocks']} | {o['moved_per_pass'] / GIB:.1f} GiB x {o['passes']:g} = "
                         f"{o['transfer_seconds']:g} s |")
    return "\n".join(lines)


def _table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*row).rstrip() for row in [header, ["-" * w for w in widths], *lines])


# --- the projection checked on a model small enough to measure at depth -------------------------------------

CHECK_DEPTHS: tuple[int, ...] = (1, 2, 4)
CHECK_TARGET = 8
"""The narrow 576-image-token bench model (:mod:`xmllm.bench.models`) has 8 decoder blocks: the line
through 1, 2 and 4 of them is projected to 8 and compared with the measured 8-block peak."""
CHECK_TOLERANCE = 0.10


def narrow_builder(folder: Any, values: str = "free", dtype: torch.dtype = DTYPE) -> Callable[[int, int], Any]:
    """Builds the narrow bench model (its own saved config and processor) cut to a decoder depth."""
    import copy

    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration
    from xmllm.explainers.models import LoadedModel, adapter_for

    from .free_compute import materialise, parameters_on_meta
    from .models import build_llava_576

    folder = build_llava_576(folder)
    base = AutoConfig.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)

    def builder(layers: int, vision_layers: int) -> Any:
        config = copy.deepcopy(base)
        config.text_config.num_hidden_layers = layers
        config.vision_config.num_hidden_layers = vision_layers
        with parameters_on_meta():
            model = LlavaForConditionalGeneration(config)
        model = materialise(model, dtype, "cpu", values=values)
        model.set_attn_implementation("eager")
        model.generation_config.eos_token_id = None  # as scale_configs.build: generations run to their limit
        return LoadedModel(model, processor, adapter_for(model, processor), "llava-576 (cut)", str(folder),
                           torch.device("cpu"), dtype, eager_attention=True)

    return builder


def projection_check(folder: Any, ids: Sequence[str] | None = None,
                     tell: Callable[[str], None] | None = None, recompute: bool = True) -> list[dict[str, Any]]:
    """Per run key (each explainer, and with ``recompute`` the recomputed run of each one that
    differentiates): the 8-block peak of the narrow bench model projected from 1, 2 and 4 blocks
    (trial batches and all, as ``--scale`` measures), against the 8-block peak measured at the batch the
    defaults use (free arithmetic on the CPU, the device's default budget)."""
    from transformers import AutoConfig

    from .models import demo_sample

    ids = run_keys(list(ids or sample_level_ids()), recompute)
    builder = narrow_builder(folder)
    vision = AutoConfig.from_pretrained(folder).vision_config.num_hidden_layers
    points = [(layers, vision) for layers in CHECK_DEPTHS]
    full = (CHECK_TARGET, vision)
    image = demo_sample().images[0]
    runs, plans, small, _ = measure_points(builder, image, ids, points, full, None, torch.device("cpu"), tell,
                                           "llava-576")
    loaded = builder(CHECK_TARGET, vision)
    prep = forced(loaded, image)
    out = []
    with planning(*full, device="cuda"):
        for key in ids:
            eid, extra = split_key(key)
            chosen = plans[key]
            if tell is not None:
                tell(f"llava-576 {CHECK_TARGET}+{vision} {key}")
            params = {**(chosen.at(chosen.batch) if chosen.batch else chosen.params), **extra}
            target = measure_one(eid, _prep_for(prep, chosen), params, torch.device("cpu"), chosen.batch,
                                 chosen.stop_backwards)
            measured = [*runs[key].values(), *([small[key]] if key in small else [])]
            failed = target.error or next((m.error for m in measured if m.error), None)
            if failed or target.peak is None or any(m.peak is None for m in measured):
                out.append({"explainer": key, "error": failed or "no peak measured"})
                continue
            row = projection(runs[key], points, chosen, small.get(key), full, vision=False)
            projected = row["projected_activation_bytes"]
            out.append({"explainer": key, "peaks": {f"{k[0]}": m.peak for k, m in runs[key].items()},
                        "measured": target.peak, "projected": projected,
                        "error_share": (projected - target.peak) / target.peak, "fit": row["fit"],
                        "batch": chosen.batch, "trials": list(chosen.trials), "note": chosen.note})
    return out
