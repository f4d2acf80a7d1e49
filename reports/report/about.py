"""What a report says about each explainer: its registry metadata and the catalog leaves that list it."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

ARXIV_ABS = "https://arxiv.org/abs/{}"


@dataclass(frozen=True)
class Paper:
    title: str
    year: int | None
    arxiv: str | None
    authors: str = ""

    @property
    def url(self) -> str | None:
        return ARXIV_ABS.format(self.arxiv) if self.arxiv else None


@dataclass(frozen=True)
class LeafRef:
    """A catalog leaf that lists the explainer, with the papers the survey files under it."""

    id: str
    path: tuple[str, ...]
    description: str
    papers: tuple[Paper, ...] = ()


@dataclass(frozen=True)
class About:
    """Registry facts about one explainer id (empty where the id is not registered here)."""

    id: str
    title: str
    group: str = ""
    summary: str = ""
    registered: bool = True
    citations: tuple[Paper, ...] = ()
    leaves: tuple[LeafRef, ...] = field(default_factory=tuple)


def about(explainer_id: str) -> About:
    """The explainer's title, summary, citations and catalog leaves."""
    from xmllm.explainers.registry import registered

    leaves = leaves_by_explainer().get(explainer_id, ())
    cls = registered().get(explainer_id)
    if cls is None:
        return About(explainer_id, explainer_id, registered=False, leaves=leaves,
                     summary="This explainer is not registered in this installation; its arrays are shown as saved.")
    citations = tuple(Paper(c.title, c.year, c.arxiv, c.authors) for c in cls.citations)
    return About(explainer_id, cls.title, cls.group, cls.summary, True, citations, leaves)


@lru_cache(maxsize=1)
def leaves_by_explainer() -> dict[str, tuple[LeafRef, ...]]:
    """Every catalog leaf, indexed by each explainer id it lists."""
    from xmllm.catalog import load_catalog

    index: dict[str, list[LeafRef]] = {}
    for path, leaf in load_catalog().iter_leaves():
        papers = tuple(Paper(m.name, m.year, m.arxiv) for m in leaf.methods)
        ref = LeafRef(leaf.id, tuple(path), leaf.description, papers)
        for eid in leaf.explainers:
            index.setdefault(eid, []).append(ref)
    return {k: tuple(v) for k, v in index.items()}


def survey() -> dict[str, Any]:
    """The survey the catalog follows (title, authors, year, arXiv link)."""
    from xmllm.catalog import load_catalog

    s = load_catalog().survey
    return {"title": s.title, "authors": s.authors, "year": s.year, "url": ARXIV_ABS.format(s.arxiv)}
