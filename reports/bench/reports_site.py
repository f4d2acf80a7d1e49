"""What a user ships and waits for: the size of one report with every sample-level explainer
(target <= 3 MB, so it can be mailed) and ``xmllm build`` fresh against cached (target: the
cached build takes at most a fifth of the fresh one), both measured in this run.

The builds go into temporary folders with a temporary cache, so the user's ``public/`` and
cache are never touched; ``--quick`` builds with few case-study pairs.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from . import BenchContext, BenchRow
from .models import MAIN

GROUP_REPORT = "report.size"
GROUP_BUILD = "build.cached"
GROUP_FRESH = "build.fresh"
SIZE_TARGET_BYTES = 3 * 2**20
PAIRS, QUICK_PAIRS = 100, 8


def quick_explainers() -> list[str]:
    """``--quick`` builds examples of these only (a smoke run, not the measurement): one cheap
    explainer that reads attention, one that backpropagates and one that only scores the answer."""
    from xmllm.explainers.methods.attention import AttentionSummary
    from xmllm.explainers.methods.inference import Uncertainty
    from xmllm.explainers.methods.relevancy import CheferRelevancy

    return [AttentionSummary.id, CheferRelevancy.id, Uncertainty.id]


def report_size(ctx: BenchContext) -> BenchRow:
    """Bytes of the report of one demo sample explained by every sample-level explainer."""
    from xmllm.explainers.demo.samples import generate_sample, to_explain_sample
    from xmllm.explainers.models.loading import DEMO_EARLY_SPEC
    from xmllm.explainers.registry import Need, registered, sample_level_ids
    from xmllm.report.explained import REPORT
    from xmllm.pipeline import make_plan
    from xmllm.runner import run_explainers

    loaded = ctx.models[MAIN]
    ids = sample_level_ids()
    params: dict[str, dict] = {}
    skipped = []
    for eid in [e for e in ids if Need.CHECKPOINTS in registered()[e].needs]:
        if ctx.spec == "demo":  # a second checkpoint: the demo ships its early one
            params[eid] = {"other": DEMO_EARLY_SPEC}
        else:
            ids.remove(eid)
            skipped.append(eid)
    sample = to_explain_sample(generate_sample(0, 0))
    with tempfile.TemporaryDirectory(prefix="xmllm-bench-report-") as tmp:
        result = run_explainers(loaded, sample, make_plan(ids, params))
        path = result.save(Path(tmp)) / REPORT
        size = path.stat().st_size
    return BenchRow(GROUP_REPORT, "report with every sample-level explainer / 3 MB",
                    size / SIZE_TARGET_BYTES, "<= 1", MAIN, {"explainers": len(ids), "skipped": skipped, "bytes": size},
                    ours=float(size), reference=float(SIZE_TARGET_BYTES), unit="B")


FRESH_BUILD_TARGET_S = 60.0
"""What the first ``xmllm build`` on a fresh clone (cold cache, the full demo job) may take on a
2-core machine: the wait a newcomer accepts before seeing the site."""


def build_times(ctx: BenchContext) -> list[BenchRow]:
    """A fresh build (empty cache) then the same build again (nothing changed): the second's time
    against the first's, and the first's against :data:`FRESH_BUILD_TARGET_S` (held to it only
    for the full job: ``--quick`` builds fewer examples and pairs)."""
    from xmllm.build import BuildOptions, build_site

    pairs = QUICK_PAIRS if ctx.quick else PAIRS
    with tempfile.TemporaryDirectory(prefix="xmllm-bench-build-") as tmp:
        opts = BuildOptions(out=Path(tmp) / "public", cache=Path(tmp) / "cache", model=ctx.spec, pairs=pairs,
                            explainers=quick_explainers() if ctx.quick else None, progress=False)
        t0 = time.perf_counter()
        first = build_site(opts)
        fresh = time.perf_counter() - t0
        t0 = time.perf_counter()
        second = build_site(opts)
        cached = time.perf_counter() - t0
    again = BenchRow(GROUP_BUILD, "time: second build, nothing changed / fresh build", cached / fresh, "<= 0.2",
                    MAIN, {"pairs": pairs, "fresh_cache_misses": first.cache_misses,
                           "second_cache_hits": second.cache_hits, "second_cache_misses": second.cache_misses,
                           "examples": first.examples},
                    ours=cached, reference=fresh, unit="s")
    first_time = BenchRow(GROUP_FRESH, f"time: fresh build, cold cache / {FRESH_BUILD_TARGET_S:.0f} s",
                          fresh / FRESH_BUILD_TARGET_S, None if ctx.quick else "<= 1", MAIN,
                          {"pairs": pairs, "examples": first.examples,
                           "steps_seconds": {k: round(v, 2) for k, v in first.steps.items()}},
                          ours=fresh, reference=FRESH_BUILD_TARGET_S, unit="s")
    return [again, first_time]


def cases(ctx: BenchContext) -> list[BenchRow]:
    if MAIN not in ctx.models:
        return []
    rows = []
    if ctx.selects(GROUP_REPORT):
        ctx.tell(GROUP_REPORT)
        rows.append(report_size(ctx))
    if ctx.selects(GROUP_BUILD) or ctx.selects(GROUP_FRESH):
        ctx.tell(GROUP_BUILD)
        rows.extend(build_times(ctx))
    return rows
