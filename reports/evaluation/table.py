"""The evaluation's table as plain text: what ``xmllm evaluate`` prints and saves."""
from __future__ import annotations

from typing import Any

from xmllm.evaluation.scoring import RANDOM_LABEL


def cell(entry: dict[str, Any] | None, digits: int = 3) -> str:
    """``mean [low, high]`` or ``n/a``."""
    if not entry or entry.get("mean") is None:
        return "n/a"
    return f"{entry['mean']:.{digits}f} [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"


def arrow(metric: dict[str, Any]) -> str:
    return "↑" if metric["higher_is_better"] else "↓"


def row_label(eid: str) -> str:
    return "random (floor)" if eid == RANDOM_LABEL else eid


def text_table(result: dict[str, Any]) -> str:
    """One row per explainer and one for the random floor; mean [95% interval] per metric,
    the sanity check's final correlation, and the flags."""
    metrics = result["metrics"]
    sanity = result.get("sanity") or {}
    head = ["explainer", *(f"{m['title'].lower()} {arrow(m)}" for m in metrics), "sanity ρ", "flags"]
    rows = []
    for eid in [*result["config"]["explainers"], RANDOM_LABEL]:
        check = sanity.get("explainers", {}).get(eid)
        rho = "" if eid == RANDOM_LABEL else ("n/a" if not check or check["final"] is None else f"{check['final']:.2f}")
        flags = ", ".join(f["kind"] for f in result["flags"].get(eid, [])) if eid != RANDOM_LABEL else ""
        rows.append([row_label(eid), *(cell(result["table"][eid].get(m["name"])) for m in metrics), rho,
                     flags or ("" if eid == RANDOM_LABEL else "ok")])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    samples = result["samples"]
    verdict = result["verdict"]
    timing = result["timings"]["per_sample"]
    lines.append("")
    lines.append(f"{samples['n']} samples ({samples['with_truth']} with ground truth); means with 95% bootstrap intervals; "
                 f"baseline {result['config']['baseline']}, {result['config']['steps']} curve steps, seed {result['config']['seed']}")
    if verdict["best_pointing"]:
        met = "meets" if verdict["meets_pointing_bar"] else "misses"
        lines.append(f"best pointing game among trusted explainers: {verdict['best_pointing']} "
                     f"{verdict['best_pointing_game']:.3f} ({met} the {verdict['pointing_bar']} bar)")
    if verdict.get("best_flagged"):
        lines.append(f"{verdict['best_flagged']} points better ({verdict['best_flagged_pointing_game']:.3f}) but is flagged")
    if verdict.get("provisional"):
        lines.append(f"provisional: {verdict['grounded_samples']} grounded samples, fewer than {verdict['min_samples']}; "
                     "verdicts may change with more samples")
    for eid, flags in result["flags"].items():
        for flag in flags:
            lines.append(f"flag {eid}: {flag['kind']}: {flag['text']}")
    for eid, err in result.get("errors", {}).items():
        lines.append(f"errors {eid}: {err['count']} sample(s), first {err['first']}")
    for eid, warned in result.get("warnings", {}).items():
        lines.append(f"warned {eid}: {warned['count']} of {samples['n']} sample(s), first {warned['first']}")
    for eid, why in result.get("skipped_explainers", {}).items():
        lines.append(f"skipped {eid}: {why}")
    lines.append(f"cost per sample: {timing['wall_seconds']:.2f} s wall, {timing['cpu_seconds']:.2f} s CPU "
                 f"(explain + metrics; sanity check {result['timings']['sanity']['wall_seconds']:.1f} s in all)")
    return "\n".join(lines) + "\n"
