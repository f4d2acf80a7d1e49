"""Which explainer to trust: run explainers over samples, score their maps, write the table and page.

``evaluate`` runs and scores (see :mod:`.scoring`), ``text_table`` prints, ``save_result`` writes
the JSON, ``trust_page_markdown`` and ``write_trust_page`` make the site page.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xmllm.files import atomic

from .page import read_result, trust_page_markdown, write_page, write_plots, write_trust_page
from xmllm.evaluation.scoring import POINTING_BAR, SANITY_SAMPLES, EvaluationConfig, evaluate, summarise
from .samples import demo_samples, jsonl_samples
from .table import text_table

RESULT_NAME = "evaluation.json"
TABLE_NAME = "table.txt"


def save_result(result: dict[str, Any], out_dir: Path) -> Path:
    """Write ``evaluation.json`` (atomically) into ``out_dir``; returns its path."""
    target = Path(out_dir) / RESULT_NAME
    atomic(target, lambda fh: json.dump(result, fh, indent=1, sort_keys=True, allow_nan=False))
    return target


__all__ = [
    "POINTING_BAR", "SANITY_SAMPLES", "EvaluationConfig", "evaluate", "summarise", "demo_samples",
    "jsonl_samples", "text_table", "save_result", "read_result", "trust_page_markdown", "write_page", "write_plots",
    "write_trust_page", "RESULT_NAME", "TABLE_NAME",
]
