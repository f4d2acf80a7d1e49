"""What a page generator hands back: files to write under the docs folder, and nav entries."""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

GENERATED = "generated"
"""Folder under the docs folder that holds every generated Markdown page (git-ignored)."""
REPORTS = "reports"
"""Folder under the docs folder that holds the rendered example reports (git-ignored)."""


@dataclass(frozen=True)
class Page:
    """One file under the docs folder: ``path`` is POSIX and relative to it."""

    path: str
    content: str | bytes


@dataclass
class SiteOutput:
    """Pages to write, and nav sections keyed by the placeholder page they expand in mkdocs.yml."""

    pages: list[Page] = field(default_factory=list)
    nav: dict[str, list[Any]] = field(default_factory=dict)

    def add(self, path: str, content: str | bytes) -> None:
        self.pages.append(Page(path, content))

    def extend(self, other: "SiteOutput") -> None:
        self.pages.extend(other.pages)
        self.nav.update(other.nav)


def nav_title(value: str) -> str:
    """A nav title, HTML-escaped: MkDocs puts nav titles into ``<title>`` and the menu unescaped.

    Every generated page gets its nav title this way; without one MkDocs takes the title from
    the page's H1 *unescaped*, so ``# &lt;/title&gt;...`` would turn back into markup.
    """
    import html

    return html.escape(" ".join(str(value).split()), quote=False)


def relative(from_page: str, to_path: str) -> str:
    """The link from page ``from_page`` to ``to_path`` (both relative to the docs folder)."""
    return posixpath.relpath(to_path, posixpath.dirname(from_page) or ".")
