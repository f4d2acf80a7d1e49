"""Pydantic models of the catalog file.

Strict types and ``extra="forbid"`` so that a typo in the YAML (``explainer:`` for
``explainers:``, ``year: "2024"``) fails loudly instead of silently dropping data.
Checks that need the whole tree (id hierarchy, duplicate ids) live in :mod:`xmllm.catalog.loader`,
where they can report the path of the offending node.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

ARXIV_RE = re.compile(r"^\d{4}\.\d{4,5}$")
# Dotted, lower-case, hyphenated segments: ``model``, ``model.token``, ``model.token.visual-text``.
NODE_ID_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*(?:\.[a-z0-9]+(?:-[a-z0-9]+)*)*$")
# A place in the survey a reader can turn to: a page, a section or a figure (or table).
SOURCE_RE = re.compile(r"\b(?:pages?|pp?\.|sections?|sec\.|figures?|fig\.|tables?)(?=\W|$)|§", re.IGNORECASE)


def _arxiv(value: str) -> str:
    if not ARXIV_RE.match(value):
        raise ValueError(f"malformed arXiv id {value!r} (expected NNNN.NNNNN or NNNN.NNNN)")
    return value


def _node_id(value: str) -> str:
    if not NODE_ID_RE.match(value):
        raise ValueError(f"malformed id {value!r} (expected lower-case dotted segments like 'model.token.visual')")
    return value


def _source(value: str) -> str:
    if not SOURCE_RE.search(value):
        raise ValueError(f"source {value!r} must say where in the survey: a page, section or figure "
                         "(e.g. 'Figure 2' or 'section Data > Benchmark')")
    return value


def _explainer_id(value: str) -> str:
    # Imported here: the registry loads the built-in explainer modules on first use.
    from xmllm.explainers.registry import registered

    if value not in registered():
        raise ValueError(f"unknown explainer id {value!r}; run 'xmllm explainers' to list them")
    return value


def _non_empty(what: str) -> Callable[[list[Any]], list[Any]]:
    def check(items: list[Any]) -> list[Any]:
        if not items:
            raise ValueError(f"needs at least one {what}")
        return items

    return check


def _unique(items: list[str]) -> list[str]:
    seen: set[str] = set()
    for item in items:
        if item in seen:
            raise ValueError(f"explainer id {item!r} is listed twice")
        seen.add(item)
    return items


Text = Annotated[str, Field(min_length=1)]
ArxivId = Annotated[str, AfterValidator(_arxiv)]
NodeId = Annotated[str, AfterValidator(_node_id)]
Source = Annotated[str, Field(min_length=1), AfterValidator(_source)]
ExplainerId = Annotated[str, AfterValidator(_explainer_id)]
Year = Annotated[int, Field(ge=1950, le=2100)]
RefNumber = Annotated[int, Field(ge=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Survey(_Strict):
    """The survey the taxonomy comes from."""

    title: Text
    authors: Text
    year: Year
    arxiv: ArxivId
    url: Text | None = None
    taxonomy_figure: Text | None = None
    """The survey's figure whose boxes are the leaves and whose reference numbers ``survey_refs``
    copies (``Figure 2``); the taxonomy page says the catalog matches it."""


class Terms(_Strict):
    """The survey's two words, kept apart on purpose."""

    interpretability: Text
    explainability: Text


class Method(_Strict):
    """A published method the survey cites for a leaf; ``candidate`` until checked against the survey.

    ``confirmed`` is a claim about the survey, so it carries its ``source``: the page, section or
    figure where the survey names the work. A confirmation without one is refused, naming the method.
    """

    name: Text
    year: Year
    arxiv: ArxivId | None = None
    confidence: Literal["confirmed", "candidate"]
    source: Source | None = None
    note: Text | None = None

    @model_validator(mode="after")
    def _confirmed_has_a_source(self) -> "Method":
        if self.confidence == "confirmed" and self.source is None:
            raise ValueError(f"method {self.name!r} is marked confirmed but records no source: add "
                             "'source:' with the page, section or figure of the survey that names it, "
                             "or mark it 'candidate'")
        return self


class RunnableRef(_Strict):
    """A published method behind a leaf's ``runnable_as`` that the survey is not known to cite:
    kept apart from the cited ``methods`` so that the leaf never passes it off as the survey's."""

    name: Text
    year: Year
    arxiv: ArxivId | None = None
    note: Text | None = None


class Leaf(_Strict):
    """A leaf of the survey's tree and the explainers that put it into practice."""

    id: NodeId
    name: Text
    description: Text
    survey_refs: Annotated[list[RefNumber], AfterValidator(_non_empty("survey reference number"))]
    methods: list[Method]
    explainers: Annotated[list[ExplainerId], AfterValidator(_non_empty("explainer id")), AfterValidator(_unique)]
    runnable_as: Text | None = None
    runnable_refs: list[RunnableRef] = []
    """Papers behind ``runnable_as`` that the survey is not known to cite (e.g. POPE, CHAIR)."""

    @model_validator(mode="after")
    def _cited_and_runnable_apart(self) -> "Leaf":
        cited = {m.arxiv for m in self.methods if m.arxiv} | {m.name for m in self.methods}
        for ref in self.runnable_refs:
            if ref.name in cited or (ref.arxiv and ref.arxiv in cited):
                raise ValueError(f"{ref.name!r} is listed both as a cited method and in runnable_refs; "
                                 "keep it in one of them")
        return self


class Group(_Strict):
    """An intermediate node (e.g. Model > Token)."""

    id: NodeId
    name: Text
    description: Text | None = None
    leaves: Annotated[list[Leaf], AfterValidator(_non_empty("leaf"))]


class Perspective(_Strict):
    """A top-level branch: leaves directly, groups of leaves, or both."""

    id: NodeId
    name: Text
    description: Text | None = None
    children: list[Group] = []
    leaves: list[Leaf] = []


class Catalog(_Strict):
    """The whole file."""

    survey: Survey
    terms: Terms
    perspectives: Annotated[list[Perspective], AfterValidator(_non_empty("perspective"))]

    def iter_leaves(self) -> Iterator[tuple[list[str], Leaf]]:
        """Every leaf in document order with its path of names, the leaf's own name last."""
        for p in self.perspectives:
            for leaf in p.leaves:
                yield [p.name, leaf.name], leaf
            for g in p.children:
                for leaf in g.leaves:
                    yield [p.name, g.name, leaf.name], leaf

    def leaves(self) -> list[Leaf]:
        return [leaf for _, leaf in self.iter_leaves()]
