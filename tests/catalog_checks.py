"""Helpers the catalog tests share: run ``xmllm catalog --check`` on a bad file, find a line."""
from __future__ import annotations

from pathlib import Path

from xmllm.cli import main

CATALOG_HEAD = """\
survey:
  title: A survey
  authors: Someone et al.
  year: 2024
  arxiv: "2412.02104"
terms:
  interpretability: inside
  explainability: outside
perspectives:
  - id: data
    name: Data
"""
"""The start of a small catalog file: the survey, its terms and the Data perspective (leaves follow)."""


def check_fails(tmp_path: Path, capsys, text: str) -> str:
    """``xmllm catalog --check`` on ``text`` fails: exit 2, nothing on stdout, one line on stderr that
    names the file first. Returns that line without the ``xmllm: error: `` prefix."""
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    assert main(["catalog", "--check", str(f)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"xmllm: error: {f}")
    return lines[0].removeprefix("xmllm: error: ")


def line_of(text: str, needle: str) -> int:
    """The 1-based number of the first line of ``text`` that contains ``needle``."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)
