"""Markdown building blocks that escape what they are given.

Text from the catalog, the registry or a model answer goes through :func:`text` (or
:func:`cell` in tables): HTML special characters become entities, so raw HTML cannot pass, and
Markdown's own specials are backslash-escaped, so the words show as written. Links are only made
to arXiv ids (checked against the arXiv pattern) and to the site's own pages.
"""
from __future__ import annotations

import html
import re
from typing import Any, Iterable, Sequence
from urllib.parse import quote

_MD_SPECIALS = re.compile(r"([\\`*_{}\[\]()#+!|])")
_LIST_START = re.compile(r"^(\s*)(\d+)\.(\s)")
_BULLET_START = re.compile(r"^(\s*)([-+*>])")
_ARXIV = re.compile(r"^\d{4}\.\d{4,5}(v\d+)?$")
_DOC_CODE = re.compile(r"``(.+?)``|:[a-z]+:`~?([^`]+)`")


def _escape(s: str) -> str:
    """Markdown specials backslash-escaped first, then HTML specials as entities (whose ``#``
    must not be escaped again)."""
    return html.escape(_MD_SPECIALS.sub(r"\\\1", s), quote=False)


def text(value: Any) -> str:
    """Inline text: one line, HTML escaped, Markdown specials backslash-escaped."""
    s = _escape(" ".join(str(value).split()))
    s = _LIST_START.sub(r"\1\2\\.\3", s)
    return _BULLET_START.sub(r"\1\\\2", s)


def cell(value: Any) -> str:
    """A table cell: :func:`text`, with empty values shown as a dash."""
    if value is None or value == "":
        return "&ndash;"
    return text(value)


def code(value: Any) -> str:
    """An inline code span: shown literally (Markdown escapes ``<`` in code spans itself)."""
    s = " ".join(str(value).split())
    run = max((len(m) for m in re.findall(r"`+", s)), default=0)
    fence = "`" * (run + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def docstring(value: str | None) -> str:
    """A Python docstring as Markdown paragraphs: ````x```` and ``:role:`x``` become code spans."""
    if not value:
        return ""
    import inspect

    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(value))
    out = []
    for para in paragraphs:
        pieces, last = [], 0
        para = re.sub(r"\s+", " ", para)
        for match in _DOC_CODE.finditer(para):
            pieces.append(_escape(para[last:match.start()]))
            pieces.append(code(match.group(1) or match.group(2).rpartition(".")[2]))
            last = match.end()
        pieces.append(_escape(para[last:]))
        joined = "".join(pieces).strip()
        if joined:
            out.append(joined)
    return "\n\n".join(out)


def link(label: str, href: str) -> str:
    """A link to one of the site's own files; ``label`` is escaped, ``href`` percent-quoted."""
    return f"[{text(label)}]({quote(href, safe='/#.-_~')})"


def arxiv_url(arxiv: str) -> str:
    if not _ARXIV.match(arxiv):
        raise ValueError(f"not an arXiv id: {arxiv!r}")
    return f"https://arxiv.org/abs/{arxiv}"


def arxiv_link(arxiv: str | None) -> str:
    """``[arXiv:NNNN.NNNNN](https://arxiv.org/abs/...)``, or a dash when there is no id."""
    if not arxiv:
        return "&ndash;"
    return f"[arXiv:{arxiv}]({arxiv_url(arxiv)})"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table; cells must already be escaped (use :func:`cell`, :func:`link`, ...)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def number(value: float | None, digits: int = 3) -> str:
    if value is None or value != value:  # None or NaN
        return "&ndash;"
    return f"{value:.{digits}f}"


def percent(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:
        return "&ndash;"
    return f"{100 * value:.{digits}f}%"


def interval(lo: float | None, hi: float | None, as_percent: bool = False, digits: int = 3) -> str:
    fmt = (lambda v: percent(v, 1)) if as_percent else (lambda v: number(v, digits))
    return f"[{fmt(lo)}, {fmt(hi)}]"


def seconds(value: float | None) -> str:
    if value is None:
        return "&ndash;"
    return f"{value:.2f} s" if value < 100 else f"{value:.0f} s"
