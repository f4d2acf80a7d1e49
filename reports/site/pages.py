"""What page generators take and hand back: the build's example runs in, files to write under the
docs folder and nav entries out."""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GENERATED = "generated"
"""Folder under the docs folder that holds every generated Markdown page (git-ignored)."""
REPORTS = "reports"
"""Folder under the docs folder that holds the rendered example reports (git-ignored)."""
EXPLAINERS_DIR = f"{GENERATED}/explainers"
TAXONOMY_DIR = f"{GENERATED}/taxonomy"


def explainer_page(explainer_id: str) -> str:
    """Where an explainer's page lives (every page that links to it asks here)."""
    return f"{EXPLAINERS_DIR}/{explainer_id}.md"


def leaf_page(leaf_id: str) -> str:
    """Where a taxonomy leaf's page lives."""
    return f"{TAXONOMY_DIR}/{leaf_id}.md"


@dataclass
class ExampleResult:
    """One explainer's example as the pages need it."""

    explainer: str
    run_dir: Path
    report: str | None
    """Path of the HTML report relative to the docs folder (None if not rendered)."""
    manifest: dict[str, Any]
    cached: bool

    @property
    def seconds(self) -> float | None:
        return self.manifest.get("timings_seconds", {}).get(self.explainer)

    @property
    def prepare_seconds(self) -> float | None:
        return self.manifest.get("timings_seconds", {}).get("prepare")

    @property
    def sample_id(self) -> str:
        if "sample" in self.manifest:
            return str(self.manifest["sample"].get("id", "sample"))
        return f"{len(self.manifest.get('samples', []))} samples"

    @property
    def question(self) -> str:
        if "sample" in self.manifest:
            return str(self.manifest["sample"].get("question", ""))
        return f"a set of {len(self.manifest.get('samples', []))} demo samples"

    @property
    def expected(self) -> str | None:
        return self.manifest.get("sample", {}).get("expected")

    @property
    def answer(self) -> str:
        return str(self.manifest.get("answer", {}).get("text", ""))


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
