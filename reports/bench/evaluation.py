"""What ``xmllm evaluate`` costs per sample on the demo model, and what ``--demo 500`` would take.

One evaluation of a few object-grounded demo questions with the evaluation's default explainers
(every sample-level one that gives an image map and whose class leaves ``evaluated_by_default``
empty) and metrics, and the randomisation cascade on one or two of them. Reported: wall and CPU seconds
per sample (explain, score, both; per explainer in the details), the metrics' share, the
cascade's seconds per (sample, stage), and the projected minutes of ``xmllm evaluate --demo 500``
on this machine, held to ``<= 15``: from wall seconds (what a user waits, other load included) and
from this process's CPU seconds (every thread's, so an upper bound for an otherwise idle machine).
"""
from __future__ import annotations

from typing import Any

from ..evaluation import SANITY_SAMPLES
from . import BenchContext, BenchRow

GROUP = "evaluate"
SAMPLES, QUICK_SAMPLES = 8, 3
SANITY, QUICK_SANITY = 2, 1
PROJECTED_SAMPLES = 500
PROJECTION_TARGET = "<= 15"
SEED = 0


def _evaluate(loaded: Any, samples: int, sanity: int) -> dict[str, Any]:
    from xmllm.explainers.registry import sample_level_ids

    from ..evaluation import EvaluationConfig, demo_samples, evaluate

    ids = sample_level_ids()
    config = EvaluationConfig(ids, seed=SEED, sanity_samples=sanity)
    return evaluate(loaded, demo_samples(samples, SEED), config, {"source": "demo", "seed": SEED})


def cases(ctx: BenchContext) -> list[BenchRow]:
    if "demo" not in ctx.models:
        return []
    from xmllm.explainers.metrics.sanity import cascade

    loaded = ctx.models["demo"]
    n = QUICK_SAMPLES if ctx.quick else SAMPLES
    result = _evaluate(loaded, n, QUICK_SANITY if ctx.quick else SANITY)
    timings = result["timings"]
    per_sample, metrics = timings["per_sample"], timings["metrics"]
    stages = len(cascade(loaded))
    sanity_runs = max(result["config"]["sanity_samples"] * stages, 1)
    sanity_per_run = timings["sanity"]["wall_seconds"] / sanity_runs
    sanity_cpu_per_run = timings["sanity"]["cpu_seconds"] / sanity_runs
    projected = (per_sample["wall_seconds"] * PROJECTED_SAMPLES + sanity_per_run * SANITY_SAMPLES * stages) / 60.0
    projected_cpu = (per_sample["cpu_seconds"] * PROJECTED_SAMPLES + sanity_cpu_per_run * SANITY_SAMPLES * stages) / 60.0
    details = {
        "samples": n,
        "explainers": result["config"]["explainers"],
        "maps_per_sample": len(result["config"]["explainers"]) + 1,
        "cpu_seconds_per_sample": per_sample["cpu_seconds"],
        "threads": timings["threads"],
        "explainer_wall_seconds": {k: v["wall_seconds"] for k, v in timings["explainers"].items()},
        "explainer_cpu_seconds": {k: v["cpu_seconds"] for k, v in timings["explainers"].items()},
        "prepare_cpu_seconds": timings["prepare"]["cpu_seconds"],
        "left_out_of_default_set": result["skipped_explainers"],
        "metrics_wall_seconds_per_sample": metrics["wall_seconds"],
        "metrics_cpu_seconds_per_sample": metrics["cpu_seconds"],
        "curve_steps": result["config"]["steps"],
        "sanity_stages": stages,
        "note": "wall seconds include any other load on the machine; CPU seconds are this process's own",
    }
    return [
        BenchRow(GROUP, "seconds per sample: every image-map explainer + every metric (wall)",
                 per_sample["wall_seconds"], None, "demo", details),
        BenchRow(GROUP, "seconds per sample: the metrics alone, all maps and the random floor (wall)",
                 metrics["wall_seconds"], None, "demo", details),
        BenchRow(GROUP, "seconds per (sample, cascade stage): the randomisation check (wall)",
                 round(sanity_per_run, 4), None, "demo", details),
        BenchRow(GROUP, f"projected minutes: xmllm evaluate --demo {PROJECTED_SAMPLES} (10 sanity samples)",
                 round(projected, 2), PROJECTION_TARGET, "demo", details),
        BenchRow(GROUP, f"projected minutes from this process's CPU seconds: xmllm evaluate --demo {PROJECTED_SAMPLES} "
                 "(an upper bound for an idle machine, whatever else shares the CPU now)",
                 round(projected_cpu, 2), PROJECTION_TARGET, "demo", details),
    ]
