"""Run explainers over samples and score every image map: which explainer can be trusted.

Per sample: the model's greedy answer is prepared once; each explainer explains it and its
scored map (see xmllm.explainers.metrics.maps) goes through every registered metric alongside a
random map, the floor. After the samples, the model-randomisation cascade runs on the first
few of them. Per explainer and metric the table holds the mean with a 95% bootstrap interval;
an explainer is flagged *unfaithful* unless its deletion area beats the random floor with
non-overlapping intervals, and flagged for the *sanity check* when its maps survive the
randomisation of the model. Everything is seeded: the same model, samples and options give
the same numbers.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from xmllm.errors import XmllmError

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.prepared import ExplainSample, Prepared
    from xmllm.explainers.models import LoadedModel

    from ..pipeline import Outcome, Plan

FORMAT_VERSION = 1
SANITY_SAMPLES = 10
"""Samples the randomisation cascade runs on (every explainer, every stage, each sample)."""
MIN_VERDICT_SAMPLES = 100
"""Grounded samples below which verdicts are provisional: with fewer, a 95% interval of a
pointing game spans more than about +-0.1 and a flag can flip with a few more samples."""
POINTING_BAR = 0.9
"""The pointing game the best image-map explainer should reach on object-grounded questions."""
RANDOM_LABEL = "random"

Progress = Callable[[str, int, int], None]
"""Called as ``progress(phase, done, total)``; phases ``"samples"`` and ``"sanity"``."""


def check_options(*, baseline: str | None = None, steps: int | None = None, sanity_samples: int | None = None,
                  demo: int | None = None, demo_pictures: int | None = None, out: Any = None,
                  flags: bool = False) -> None:
    """The evaluation's options, checked once for the command line and the API alike (``flags``:
    the error names ``--steps`` rather than ``steps``), before anything is loaded."""
    from pathlib import Path

    from xmllm.explainers.masking import BASELINES

    def name(option: str) -> str:
        return f"--{option.replace('_', '-')}" if flags else option

    if baseline is not None and baseline not in BASELINES:
        raise XmllmError(f"{name('baseline')} {baseline!r}: choose from {', '.join(BASELINES)}")
    for option, value, low in (("steps", steps, 1), ("sanity_samples", sanity_samples, 0), ("demo", demo, 1),
                               ("demo_pictures", demo_pictures, 1)):
        if value is not None and value < low:
            raise XmllmError(f"{name(option)} must be {'a positive number' if low else '0 or more'}, got {value}")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise XmllmError(f"{name('out')} {out}: exists and is not a folder")


@dataclass
class EvaluationConfig:
    """What to run and how to score it."""

    explainers: list[str]
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per explainer, the user's parameters; they override the explainer's ``evaluation_params``."""
    explicit: bool = False
    """The explainers were named by the user: one without an image map is an error, not skipped."""
    seed: int = 0
    baseline: str | None = None
    steps: int | None = None
    sanity_samples: int = SANITY_SAMPLES
    batch_size: int | None = None

    def params_for(self, label: str) -> dict[str, Any]:
        """The parameters a run label stands for: the explainer's evaluation defaults (its
        ``evaluation_params``), the user's, and the variant's own (``relevancy.chefer[target=logit]``)."""
        from xmllm.explainers.registry import get_explainer

        eid, variant = split_label(label)
        return {**get_explainer(eid).evaluation_params, **self.params.get(eid, {}), **variant}

    def plan(self) -> "tuple[Plan, dict[str, str]]":
        """What the evaluation runs, checked before any model work: one step per run label with its
        parameters parsed once, and the explainers the default set leaves out (with why)."""
        from ..pipeline import Plan, check_named, plan_step

        check_named(self.explainers, self.params)
        if self.explicit:
            chosen, skipped = list(self.explainers), {}
        else:
            chosen, skipped = default_explainers(self.explainers)
        steps = [plan_step(eid, self.params_for(label), label) for eid in chosen for label in self.labels(eid)]
        return Plan(tuple(steps), seed=self.seed), skipped

    def labels(self, explainer_id: str) -> list[str]:
        """One run label per variant: explainers whose ``target`` is a parameter run once per target
        (so that the evaluation measures which target to default to), unless the user fixed it."""
        return [variant_label(explainer_id, v) for v in target_variants(explainer_id, self.params.get(explainer_id))]


VARIED = "target"
"""The parameter an evaluation varies by default: what an explainer explains (log-prob or logit)."""


def target_variants(explainer_id: str, given: dict[str, Any] | None) -> list[dict[str, Any]]:
    from xmllm.explainers.registry import get_explainer

    spec = next((s for s in get_explainer(explainer_id).Params.specs() if s.name == VARIED), None)
    if spec is None or spec.info.choices is None or VARIED in (given or {}):
        return [{}]
    return [{VARIED: choice} for choice in spec.info.choices]


def variant_label(explainer_id: str, variant: dict[str, Any]) -> str:
    return explainer_id + "".join(f"[{k}={v}]" for k, v in variant.items())


def split_label(label: str) -> tuple[str, dict[str, Any]]:
    """``relevancy.chefer[target=logit]`` -> (``relevancy.chefer``, ``{"target": "logit"}``)."""
    eid, _, rest = label.partition("[")
    variant = {}
    for part in filter(None, ("[" + rest).split("[")):
        key, _, value = part.rstrip("]").partition("=")
        variant[key] = value
    return eid, variant


UNSCORABLE_NEEDS = ("pair", "checkpoints", "labelled_set")
"""Needs a single sample cannot meet: explainers with them are left out of the default set."""


def default_explainers(candidates: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The sample-level explainers an evaluation runs when none are named, and those left out
    (with why: the explainer's own ``evaluated_by_default``, or a need one sample does not meet).
    Whether an explainer gives an image map shows on the first sample."""
    from xmllm.explainers.registry import get_explainer

    keep, left_out = [], {}
    for eid in candidates:
        cls = get_explainer(eid)
        if cls.evaluated_by_default:
            left_out[eid] = cls.evaluated_by_default
            continue
        needs = sorted(n.value for n in cls.needs if n.value in UNSCORABLE_NEEDS)
        if needs:
            left_out[eid] = f"needs {', '.join(needs)}, which one sample does not give"
        else:
            keep.append(eid)
    return keep, left_out


def _clean(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


@dataclass
class _Clock:
    wall: float = 0.0
    cpu: float = 0.0
    count: int = 0

    def timed(self, fn: Callable[[], Any]) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return fn()
        finally:
            self.wall += time.perf_counter() - wall
            self.cpu += time.process_time() - cpu
            self.count += 1

    def add(self, outcome: "Outcome") -> None:
        """Count one step of the pipeline (a skipped step: a call of no time)."""
        self.wall += outcome.wall
        self.cpu += outcome.cpu
        self.count += 1

    def per_call(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {"wall_seconds": round(self.wall / n, 4), "cpu_seconds": round(self.cpu / n, 4), "calls": self.count}


def evaluate(loaded: "LoadedModel", samples: Sequence["ExplainSample"], config: EvaluationConfig,
             source: dict[str, Any] | None = None, progress: Progress | None = None,
             planned: "tuple[Plan, dict[str, str]] | None" = None) -> dict[str, Any]:
    """Explain and score every sample, run the sanity cascade, and summarise: the result JSON.
    ``planned`` is ``config.plan()`` when the caller made it already (before loading the model).

    Each explainer runs through the pipeline (:func:`xmllm.pipeline.run_plan`); one that fails or
    refuses on its first sample is left out of a default evaluation, with why; a user's error
    (:class:`~xmllm.XmllmError`) in an explainer given parameters stops the evaluation there; later
    failures of a sample are counted per explainer. Any other exception is a bug and propagates."""
    import torch

    from xmllm import MissingInput
    from xmllm.explainers.answering import is_correct
    from xmllm.explainers.masking import scored_map_name
    from xmllm.explainers.prepared import prepare
    from xmllm.explainers.metrics import (
        DEFAULT_BASELINE,
        DEFAULT_STEPS,
        MetricInputs,
        primary_image_map,
        random_map,
        registered_metrics,
    )

    from ..pipeline import run_plan
    from ..provenance import package_versions, utc_now

    if not samples:
        raise XmllmError("no samples to evaluate")
    plan, skipped = planned or config.plan()
    baseline = config.baseline or DEFAULT_BASELINE
    steps = config.steps or DEFAULT_STEPS
    metrics = {name: cls() for name, cls in registered_metrics().items()}
    active = plan.labels
    skipped_samples: list[dict[str, str]] = []
    errors: dict[str, dict[str, Any]] = {}
    warnings: dict[str, dict[str, Any]] = {}
    """Per explainer: the samples whose explanation warned (e.g. integrated gradients' completeness gap),
    so a score over unconverged maps says so."""
    map_names: dict[str, str] = {}
    clocks = {eid: _Clock() for eid in active}
    prepare_clock, metric_clock, sanity_clock = _Clock(), _Clock(), _Clock()
    curve_sums: dict[str, dict[str, np.ndarray]] = {}
    fractions: list[float] = []
    records: list[dict[str, Any]] = []
    kept: list[tuple["Prepared", dict[str, np.ndarray]]] = []
    started, wall0, cpu0 = utc_now(), time.perf_counter(), time.process_time()

    for index, sample in enumerate(samples):
        torch.manual_seed(config.seed)
        try:
            prepared = prepare_clock.timed(lambda: prepare(loaded, sample))
        except MissingInput as error:  # e.g. an empty answer: nothing to explain on this sample
            skipped_samples.append({"id": sample.id, "reason": str(error).splitlines()[0]})
            if progress:
                progress("samples", index + 1, len(samples))
            continue
        maps: dict[str, np.ndarray] = {}
        explained: dict[str, Any] = {}
        current = plan.only(active)
        refused = current.refusals(loaded, sample)
        for outcome in run_plan(loaded, prepared, current, refused, tolerate=(XmllmError, ValueError, RuntimeError)):
            eid = outcome.label
            clocks[eid].add(outcome)
            if outcome.explanation is None:
                error = outcome.error or MissingInput(f"{plan.step(eid).id}: {outcome.skipped}")
                message = str(error).splitlines()[0]
                if clocks[eid].count == 1:  # its first sample: a setting or a need, not this sample
                    if split_label(eid)[0] in config.params:
                        if not isinstance(error, XmllmError):
                            raise error
                        raise XmllmError(f"explainer {eid}: {message}") from None
                    if not config.explicit:
                        skipped[eid] = f"fails on the first sample: {message}"
                        active.remove(eid)
                        continue
                entry = errors.setdefault(eid, {"count": 0, "first": f"{sample.id}: {message}"})
                entry["count"] += 1
                continue
            scored = primary_image_map(outcome.explanation, scored_map_name(prepared))
            if scored is None:
                if config.explicit:
                    raise XmllmError(f"explainer {eid} gives no image map; evaluate scores maps over the image grid")
                skipped[eid] = "gives no image map"
                active.remove(eid)
                continue
            warning = outcome.explanation.meta.get("warning")
            if warning:
                entry = warnings.setdefault(eid, {"count": 0, "first": f"{sample.id}: {str(warning).splitlines()[0]}"})
                entry["count"] += 1
            map_names[eid] = scored.describe()
            maps[eid] = scored.values
            explained[eid] = outcome.explanation
        if not maps:
            if not active:
                raise XmllmError("none of the explainers gives an image map to score")
            records.append(_record(sample, prepared, is_correct, None, {}))
            continue
        grid_shape = next(iter(maps.values())).shape
        maps[RANDOM_LABEL] = random_map(grid_shape, config.seed + index)
        inputs = MetricInputs(prepared, baseline=baseline, steps=steps, seed=config.seed + index,
                                batch_size=config.batch_size)
        try:
            scores, truth_cells = metric_clock.timed(lambda: _score(metrics, maps, inputs))
        except XmllmError as error:
            raise XmllmError(f"sample {sample.id!r}: {str(error).splitlines()[0]}") from None
        finite = [k for k, v in maps.items() if np.isfinite(v).all()]
        if finite:
            fractions = list(inputs.runner().fractions)
            for kind in ("deletion", "insertion"):
                for name, curve in zip(finite, inputs.curves(kind, [maps[k] for k in finite])):
                    sums = curve_sums.setdefault(name, {})
                    sums[kind] = sums.get(kind, 0.0) + curve
                    sums[f"{kind}_n"] = sums.get(f"{kind}_n", 0) + 1
        for eid, hit in image_pointing(sample, prepared, explained, config.seed + index).items():
            scores.setdefault(eid, {})[IMAGE_POINTING] = hit
        records.append(_record(sample, prepared, is_correct, truth_cells, scores))
        if len(kept) < config.sanity_samples:
            kept.append((prepared, {k: v for k, v in maps.items() if k != RANDOM_LABEL}))
        if progress:
            progress("samples", index + 1, len(samples))

    if not records:
        raise XmllmError(f"no sample could be explained; first: {skipped_samples[0]['reason']}")
    sanity = None
    scored_ids = [eid for eid in active if eid in map_names]
    if kept and scored_ids and config.sanity_samples > 0:
        from xmllm.explainers.metrics.sanity import cascade, randomisation_check

        total = len(cascade(loaded)) * len(kept)
        done = [0]

        def step(_stage: str) -> None:
            done[0] += 1
            if progress:
                progress("sanity", done[0], total)

        originals = {eid: [m.get(eid) for _, m in kept] for eid in scored_ids}
        # inside the cascade explainers go on from the randomised model's random state, unseeded
        unseeded = replace(plan, seed=None)

        def map_of(model: Any, prep: Any, label: str, params: dict[str, Any] | None) -> Any:
            outcome = next(run_plan(model, prep, unseeded.only([label])))
            scored = primary_image_map(outcome.explanation, scored_map_name(prep))
            return None if scored is None else scored.values

        sanity = sanity_clock.timed(lambda: randomisation_check(
            loaded, [p for p, _ in kept], scored_ids, {eid: config.params_for(eid) for eid in scored_ids},
            originals=originals, seed=config.seed, progress=step, map_of=map_of))

    timings = {
        "total_wall_seconds": round(time.perf_counter() - wall0, 3),
        "total_cpu_seconds": round(time.process_time() - cpu0, 3),
        "threads": torch.get_num_threads(),
        "prepare": prepare_clock.per_call(),
        "metrics": metric_clock.per_call(),
        "explainers": {eid: clocks[eid].per_call() for eid in scored_ids},
        "sanity": sanity_clock.per_call(),
    }
    # steady state: what each further sample costs (explainers without a map ran on the first only)
    steady = [prepare_clock, metric_clock, *(clocks[eid] for eid in scored_ids)]
    timings["per_sample"] = {
        "wall_seconds": round(sum(c.wall / max(c.count, 1) for c in steady), 4),
        "cpu_seconds": round(sum(c.cpu / max(c.count, 1) for c in steady), 4),
    }
    timings["probing_wall_seconds"] = round(sum(clocks[eid].wall for eid in clocks if eid not in scored_ids), 3)
    result = {
        "format": FORMAT_VERSION,
        "created": started,
        "model": loaded.provenance(),
        "samples": {**(source or {}), "n": len(samples),
                    "with_truth": sum(1 for r in records if r["truth_cells"])},
        "config": {
            "explainers": scored_ids,
            "params": {eid: config.params_for(eid) for eid in scored_ids},
            "seed": config.seed,
            "baseline": baseline,
            "steps": steps,
            "fractions": fractions,
            "sanity_samples": len(kept) if sanity else 0,
            "pointing_bar": POINTING_BAR,
        },
        "metrics": [cls.describe() for cls in registered_metrics().values()]
        + ([IMAGE_POINTING_METRIC] if any(IMAGE_POINTING in (r["scores"].get(RANDOM_LABEL) or {}) for r in records)
           else []),
        "maps": map_names,
        "skipped_explainers": skipped,
        "skipped_samples": skipped_samples,
        "errors": errors,
        "warnings": warnings,
        "per_sample": records,
        "sanity": sanity,
        "timings": timings,
        "versions": package_versions(),
    }
    result.update(summarise(result, curve_sums))
    return result


IMAGE_POINTING = "image_pointing"
IMAGE_POINTING_METRIC = {
    "name": IMAGE_POINTING, "title": "Image pointing", "higher_is_better": True, "applies_to": "image maps",
    "needs_model": False, "needs_truth": True,
    "summary": ("with several pictures and the sample's evidence_image: 1 when the picture with the largest "
                "share of the map (positive mass) is the evidence's, else 0; the random floor picks a picture "
                "at random (1 / pictures)"),
    "reference": "xmllm (#25): image-level pointing game",
}
"""Scored only on samples with several pictures and an ``evidence_image``; the cell-level metrics
then score the evidence picture's grid against its mask (:func:`~xmllm.explainers.masking.scored_picture`)."""


def image_pointing(sample: "ExplainSample", prepared: "Prepared", explained: dict[str, Any],
                   seed: int) -> dict[str, float | None]:
    """Per explainer (and the random floor): whether its largest share falls on the evidence picture."""
    from xmllm.explainers.metrics.image_shares import image_shares

    from ..runner import layouts_json

    evidence = sample.extra.get("evidence_image")
    pictures = len(sample.images)
    if evidence is None or pictures < 2:
        return {}
    layouts = layouts_json(prepared.layouts)
    out: dict[str, float | None] = {}
    for eid, exp in explained.items():
        shares = image_shares(exp, layouts, pictures)
        out[eid] = None if shares is None else float(shares.carrier + 1 == int(evidence))
    out[RANDOM_LABEL] = float(int(np.random.default_rng([seed, 0x1A6E]).integers(pictures)) + 1 == int(evidence))
    return out


def _score(metrics: dict[str, Any], maps: dict[str, np.ndarray],
           inputs: Any) -> tuple[dict[str, dict[str, float | None]], int]:
    """Every metric of every finite map (NaN-bearing maps score None); and the truth's cell count."""
    names = [k for k, v in maps.items() if np.isfinite(v).all()]
    scores: dict[str, dict[str, float | None]] = {k: {} for k in maps}
    for metric_name, metric in metrics.items():
        values = metric.compute([maps[k] for k in names], inputs) if names else []
        for k, v in zip(names, values):
            scores[k][metric_name] = _clean(float(v))
        for k in maps:
            scores[k].setdefault(metric_name, None)
    truth = inputs.truth_cells()
    return scores, 0 if truth is None else int(truth.sum())


def _record(sample: "ExplainSample", prepared: "Prepared", is_correct: Callable[[str, str], bool],
            truth_cells: int | None, scores: dict[str, Any]) -> dict[str, Any]:
    answer = prepared.answer.text
    return {
        "id": sample.id,
        "question_type": sample.extra.get("question_type"),
        "question": sample.question,
        "expected": sample.expected,
        "answer": answer,
        "correct": None if sample.expected is None else bool(is_correct(answer, sample.expected)),
        "truth_cells": truth_cells or 0,
        "scores": scores,
    }


# --- summary -------------------------------------------------------------------------------------------


def summarise(result: dict[str, Any], curve_sums: dict[str, dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """The table (mean and 95% interval per explainer and metric, random floor included), flags,
    mean curves, pointing game per question type and the verdict, from the per-sample records."""
    from xmllm.explainers.metrics.stats import mean_interval

    seed = result["config"]["seed"]
    metric_names = [m["name"] for m in result["metrics"]]
    rows = [*result["config"]["explainers"], RANDOM_LABEL]
    table: dict[str, dict[str, Any]] = {}
    question_types: dict[str, dict[str, Any]] = {}
    for eid in rows:
        values = {m: [r["scores"].get(eid, {}).get(m) for r in result["per_sample"]] for m in metric_names}
        values = {m: [v for v in vs if v is not None] for m, vs in values.items()}
        table[eid] = {m: mean_interval(vs, seed) for m, vs in values.items()}
        by_type: dict[str, list[float]] = {}
        for r in result["per_sample"]:
            value = r["scores"].get(eid, {}).get("pointing_game")
            if value is not None:
                by_type.setdefault(r["question_type"] or "-", []).append(value)
        question_types[eid] = {t: mean_interval(v, seed) for t, v in sorted(by_type.items())}
    curves = {}
    for eid, sums in (curve_sums or {}).items():
        curves[eid] = {kind: [round(float(x), 6) for x in sums[kind] / sums[f"{kind}_n"]]
                       for kind in ("deletion", "insertion") if kind in sums}
    flags = {eid: _flags(eid, table, result.get("sanity")) for eid in result["config"]["explainers"]}
    return {"table": table, "question_types": question_types, "curves": curves, "flags": flags,
            "verdict": _verdict(result, table, flags)}


def _fmt(entry: dict[str, Any]) -> str:
    if entry.get("mean") is None:
        return "n/a"
    return f"{entry['mean']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def _flags(eid: str, table: dict[str, dict[str, Any]], sanity: dict[str, Any] | None) -> list[dict[str, str]]:
    out = []
    mine, floor = table[eid].get("deletion_area", {}), table[RANDOM_LABEL].get("deletion_area", {})
    if mine.get("mean") is None or floor.get("mean") is None:
        out.append({"kind": "unfaithful", "text": "no deletion area to compare with the random floor"})
    elif not mine["high"] < floor["low"]:
        how = "is no lower than" if mine["mean"] >= floor["mean"] else "does not clear"
        out.append({"kind": "unfaithful",
                    "text": f"deletion area {_fmt(mine)} {how} the random floor {_fmt(floor)} (95% intervals overlap "
                            f"or lie above it)"})
    if sanity and eid in sanity.get("explainers", {}):
        check = sanity["explainers"][eid]
        if check["survives"]:
            out.append({"kind": "sanity",
                        "text": f"maps survive model randomisation: mean Spearman {check['final']:.2f} >= "
                                f"{sanity['threshold']} with {sanity['stages'][-1]} random"})
    return out


def _verdict(result: dict[str, Any], table: dict[str, dict[str, Any]], flags: dict[str, list]) -> dict[str, Any]:
    """Trusted and flagged explainers, and the best pointing game by the same rule: "best" is
    chosen among the trusted ones only (a flagged explainer's higher score is reported beside it,
    never as the best), and below :data:`MIN_VERDICT_SAMPLES` grounded samples the verdicts are
    marked provisional."""
    ids = result["config"]["explainers"]
    pointing = {eid: table[eid]["pointing_game"]["mean"] for eid in ids if table[eid].get("pointing_game", {}).get("mean") is not None}
    trusted = [eid for eid in ids if not flags[eid]]
    candidates = {eid: v for eid, v in pointing.items() if eid in trusted}
    best = max(candidates, key=lambda e: (candidates[e], e)) if candidates else None
    overall = max(pointing, key=lambda e: (pointing[e], e)) if pointing else None
    grounded = int(result["samples"].get("with_truth", 0))
    return {
        "best_pointing": best,
        "best_pointing_game": pointing.get(best) if best else None,
        "best_flagged": overall if overall is not None and overall != best and overall not in trusted else None,
        "best_flagged_pointing_game": pointing.get(overall) if overall is not None and overall not in trusted else None,
        "pointing_bar": POINTING_BAR,
        "meets_pointing_bar": bool(best and pointing[best] >= POINTING_BAR),
        "trusted": trusted,
        "flagged": [eid for eid in ids if flags[eid]],
        "grounded_samples": grounded,
        "min_samples": MIN_VERDICT_SAMPLES,
        "provisional": grounded < MIN_VERDICT_SAMPLES,
    }
