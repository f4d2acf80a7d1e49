"""Self-contained HTML reports of a saved run (``xmllm explain --out DIR`` -> ``DIR/report.html``).

A report is rendered from the run folder alone (``explanations.npz``, ``manifest.json`` and
the input images), so cached runs re-render without the model. Every explainer's arrays are
drawn by views chosen from their axes (:mod:`.views`); the page loads nothing from anywhere.
"""
from __future__ import annotations

from pathlib import Path

REPORT_NAME = "report.html"


def render_report(run_dir: Path) -> str:
    """The HTML page of the run saved in ``run_dir``: the same bytes on every render of it."""
    from xmllm.report.explained import load_run

    return load_run(Path(run_dir)).report_html()


def id_seed(manifest: dict) -> str:
    """What seeds a page's element ids: the run's sample, explainers and seed (not its timings or
    creation time, so that two audits of one sample render alike)."""
    import json

    sample = manifest.get("sample") if isinstance(manifest.get("sample"), dict) else {}
    return json.dumps({"sample": sample.get("sha256"), "explainers": manifest.get("explainers"),
                       "seed": manifest.get("seed")}, sort_keys=True, default=str)


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Render ``run_dir``'s report and write it atomically to ``out`` (default
    ``run_dir/report.html``); returns the path written."""
    from xmllm.files import write_atomic

    out = Path(out) if out is not None else Path(run_dir) / REPORT_NAME
    write_atomic(out, render_report(run_dir))
    return out


__all__ = ["REPORT_NAME", "render_report", "write_report"]
