"""The audit summary: ``audit.json`` (the numbers, recountable from the per-sample records) and
``summary.html`` (self-contained, escaped, nothing loaded from anywhere); :mod:`.site` writes
them with the site pages.

Only ``created`` changes between two runs of one config: run times, the executor and what was
reused go to ``run.json`` beside them.
"""
from __future__ import annotations

import json
import math
import re
from itertools import pairwise
from pathlib import Path
from typing import Any

from ..provenance import utc_now
from .config import LoadedConfig

from .store import SAMPLES
from .worker import RANDOM, RECORD, RUN

AUDIT_JSON = "audit.json"
SUMMARY_HTML = "summary.html"
RUN_JSON = "run.json"
TEMPLATE = "audit_summary.html.j2"
FORMAT = "xmllm-audit/1"
DROP_EDGES = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
"""Bins of the reliance histogram: the mean log-probability drop of the answer with a blank
image (0 or less: the image did not help; log 2 = 0.69: the probability halved)."""
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def visible(value: Any) -> str:
    """Text for display: control characters shown as escapes (``\\x1b``) instead of passed on."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                        str(value))


def report_path(out: Path, record: dict[str, Any]) -> str | None:
    """The sample's report relative to the audit folder (None for a failed sample, or with
    ``reports: false``)."""
    path = f"{SAMPLES}/{record['key']}/{RUN}/report.html"
    return path if record["status"] == "ok" and (out / path).is_file() else None


def build_summary(loaded: LoadedConfig, out: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    config = loaded.config
    ok = [r for r in records if r["status"] == "ok"]
    graded = [r for r in ok if r.get("correct") is not None]
    drops = [r["reliance"]["mean_drop_blank"] for r in ok if r["reliance"].get("mean_drop_blank") is not None]
    return {
        "format": FORMAT,
        "name": config.name,
        "created": utc_now(),
        "config": loaded.public(),
        "fingerprint": config.results_fingerprint(),
        "model": _model(out, ok),
        "counts": {"samples": len(records), "ok": len(ok), "failed": len(records) - len(ok),
                   "flagged": sum(bool(r["flags"]) for r in records), "graded": len(graded),
                   "correct": sum(bool(r["correct"]) for r in graded)},
        "accuracy": _share(sum(bool(r["correct"]) for r in graded), len(graded)),
        "reliance": {
            "histogram": histogram(drops, DROP_EDGES),
            "mean_drop_blank": _mean(drops),
            "mean_drop_noised": _mean([r["reliance"]["mean_drop_noised"] for r in ok
                                       if r["reliance"].get("mean_drop_noised") is not None]),
            "reliant_samples": sum((r["reliance"].get("reliant_share") or 0) > 0 for r in ok),
            "samples": len(ok),
            "note": "drop = log p(answer | image) - log p(answer | blank image), mean over answer tokens",
        },
        "checks": _checks(ok, config.checks),
        "faithfulness": _faithfulness(ok),
        "skipped_explainers": _skipped(ok),
        "cut_answers": sum(bool(r.get("answer_cut")) for r in ok),
        "flag_counts": {kind: sum(any(f["kind"] == kind for f in r["flags"]) for r in records) for kind in config.flags},
        "samples": [_row(out, r) for r in records],
    }


def histogram(values: list[float], edges: tuple[float, ...]) -> dict[str, Any]:
    """Counts in ``(-inf, e0], (e0, e1], ..., (e_last, inf)``, with labels."""
    counts = [0] * (len(edges) + 1)
    for v in values:
        counts[sum(v > e for e in edges)] += 1
    labels = [f"≤ {edges[0]:g}"] + [f"{a:g}–{b:g}" for a, b in pairwise(edges)] + [f"> {edges[-1]:g}"]
    return {"edges": list(edges), "labels": labels, "counts": counts}


def render_summary(data: dict[str, Any], report_prefix: str = "") -> str:
    """The summary page; links to reports are ``report_prefix + samples/<key>/run/report.html``."""
    from ..report.render import environment

    bars = _bars(data["reliance"]["histogram"])
    return environment().get_template(TEMPLATE).render(
        data=data, bars=bars, visible=visible, prefix=report_prefix, fmt=_fmt, pct=_pct,
        flagged=[s for s in data["samples"] if s["flags"]],
        failed=[s for s in data["samples"] if s["status"] == "failed"],
    )


# --- pieces ------------------------------------------------------------------------------------------


def _skipped(ok: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per explainer that could not run on some samples: on how many, and the first reason."""
    out: dict[str, dict[str, Any]] = {}
    for r in ok:
        for eid, why in (r.get("skipped") or {}).items():
            entry = out.setdefault(eid, {"samples": 0, "reason": why})
            entry["samples"] += 1
    return dict(sorted(out.items()))


def _row(out: Path, r: dict[str, Any]) -> dict[str, Any]:
    pope = (r.get("checks") or {}).get("pope") or {}
    blank = (r.get("checks") or {}).get("blank_image") or {}
    return {
        "id": r["id"], "key": r["key"], "status": r["status"], "error": r.get("error"),
        "question": r["question"], "expected": r.get("expected"), "answer": r.get("answer"),
        "correct": r.get("correct"), "image": r.get("image"),
        "reliant_share": (r.get("reliance") or {}).get("reliant_share"),
        "mean_drop_blank": (r.get("reliance") or {}).get("mean_drop_blank"),
        "hallucination": pope.get("hallucination"), "blank_answer": blank.get("answer"),
        "flags": r["flags"], "report": report_path(out, r),
        "pictures": r.get("pictures"), "evidence_image": r.get("evidence_image"), "carried_by": r.get("carried_by") or {},
    }


def _model(out: Path, ok: list[dict[str, Any]]) -> dict[str, Any]:
    """Model provenance and package versions, from the first complete sample's manifest."""
    for r in ok:
        try:
            manifest = json.loads((out / SAMPLES / r["key"] / RUN / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return {"model": manifest.get("model"), "versions": manifest.get("versions")}
    return {}


def _checks(ok: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "blank_image" in names:
        runs = [r["checks"]["blank_image"] for r in ok if "blank_image" in r["checks"]]
        unchanged = sum(bool(p.get("unchanged")) for p in runs)
        out["blank_image"] = {"asked": len(runs), "unchanged": unchanged, "flips": len(runs) - unchanged,
                              "flip_rate": _share(len(runs) - unchanged, len(runs))}
    if "pope" in names:
        runs = [r["checks"]["pope"] for r in ok if "pope" in r["checks"] and "skipped" not in r["checks"]["pope"]]
        hallucinated = sum(bool(p.get("hallucination")) for p in runs)
        missed = sum(bool(p.get("missed")) for p in runs)
        out["pope"] = {"asked": len(runs), "skipped": sum("pope" in r["checks"] for r in ok) - len(runs),
                       "hallucinations": hallucinated, "hallucination_rate": _share(hallucinated, len(runs)),
                       "missed": missed, "miss_rate": _share(missed, len(runs))}
    return out


def _faithfulness(ok: list[dict[str, Any]]) -> dict[str, Any]:
    names = sorted({n for r in ok for n in r.get("faithfulness", {})}, key=lambda n: (n == RANDOM, n))
    out = {}
    for name in names:
        rows = [r["faithfulness"] for r in ok if name in r.get("faithfulness", {})]
        dele = [f[name]["deletion_area"] for f in rows if f[name]["deletion_area"] is not None]
        ins = [f[name]["insertion_area"] for f in rows if f[name]["insertion_area"] is not None]
        beats = [f[name]["deletion_area"] < f[RANDOM]["deletion_area"] for f in rows
                 if name != RANDOM and RANDOM in f and None not in (f[name]["deletion_area"], f[RANDOM]["deletion_area"])]
        out[name] = {"samples": len(rows), "deletion_area": _mean(dele), "insertion_area": _mean(ins),
                     "beats_random": _share(sum(beats), len(beats)) if name != RANDOM else None}
    return out


def _bars(hist: dict[str, Any]) -> list[dict[str, Any]]:
    top = max(hist["counts"]) or 1
    return [{"label": label, "count": count, "height": round(100 * count / top, 1)}
            for label, count in zip(hist["labels"], hist["counts"])]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


__all__ = [
    "AUDIT_JSON",
    "RECORD",
    "RUN_JSON",
    "SUMMARY_HTML",
    "build_summary",
    "render_summary",
    "visible",
]
