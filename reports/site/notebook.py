"""The "Notebook" page: ``notebook.ipynb`` of the docs folder rendered as a Markdown page.

The notebook is the worked example of the Python API (the test suite executes it on a real
kernel). The page shows its Markdown and code cells in order, and the outputs it was saved
with, if any (plain text and images; an inline report becomes a pointer to the example reports,
which hold the same page). The notebook itself is linked for download.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .pages import GENERATED, SiteOutput

NOTEBOOK = "notebook.ipynb"
NOTEBOOK_PAGE = f"{GENERATED}/notebook.md"


def _fence(text: str, lang: str = "") -> str:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value or "")


def _output(out: dict[str, Any]) -> str | None:
    kind = out.get("output_type")
    if kind == "stream":
        return _fence(_text(out.get("text")))
    if kind == "error":
        return _fence(f"{out.get('ename', 'Error')}: {out.get('evalue', '')}")
    data = out.get("data") or {}
    if "text/html" in data and "<iframe" in _text(data["text/html"]):
        return ("*The interactive report shows here, in its own frame; the "
                "[example reports](gallery.md) are the same page.*")
    if "image/png" in data:
        return f"![output](data:image/png;base64,{_text(data['image/png']).strip()})"
    if "text/plain" in data:
        return _fence(_text(data["text/plain"]))
    return None


def render(notebook: dict[str, Any]) -> str:
    """The Markdown page of a notebook (nbformat 4 JSON)."""
    parts = [f"[Download the notebook](../{NOTEBOOK}) and run it with Jupyter; the test suite executes it "
             "on every change.", ""]
    for cell in notebook.get("cells") or []:
        source = _text(cell.get("source"))
        if cell.get("cell_type") == "markdown":
            parts += [source, ""]
        elif cell.get("cell_type") == "code":
            parts += [_fence(source, "python"), ""]
            for out in cell.get("outputs") or []:
                shown = _output(out)
                if shown:
                    parts += [shown, ""]
    return "\n".join(parts)


def generate(docs: Path) -> SiteOutput:
    """The page for ``docs/notebook.ipynb``, if the docs folder has one."""
    out = SiteOutput()
    path = Path(docs) / NOTEBOOK
    if path.is_file():
        try:
            notebook = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            from xmllm.errors import XmllmError

            raise XmllmError(f"{path}: not a readable notebook ({exc})") from None
        out.add(NOTEBOOK_PAGE, render(notebook))
    return out
