"""The taxonomy section: an overview, one page per perspective and one per leaf.

A leaf page holds the leaf's description, the methods the survey cites (with where it names the
confirmed ones) and the papers behind its runnable forms, apart, with arXiv links; the explainers
that put it into practice (with their status, cost and example report), and the survey's
reference numbers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import markdown as md
from .pages import TAXONOMY_DIR, ExampleResult, SiteOutput, explainer_page, leaf_page, nav_title, relative

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.catalog import Catalog, Leaf, Perspective

TAXONOMY_INDEX = f"{TAXONOMY_DIR}/index.md"


def perspective_page(perspective_id: str) -> str:
    return f"{TAXONOMY_DIR}/{perspective_id}.md"


def _status(explainer_id: str) -> str:
    from xmllm.explainers.registry import status

    return status(explainer_id)


def _leaf_groups(p: "Perspective") -> list[tuple[str | None, str | None, list["Leaf"]]]:
    """(group name, group description, leaves): the perspective's own leaves first."""
    out: list[tuple[str | None, str | None, list[Leaf]]] = []
    if p.leaves:
        out.append((None, None, list(p.leaves)))
    out += [(g.name, g.description, list(g.leaves)) for g in p.children]
    return out


def _explainer_rows(page: str, leaf: "Leaf", examples: dict[str, ExampleResult],
                    titles: dict[str, str]) -> list[list[str]]:
    rows = []
    for eid in leaf.explainers:
        state = _status(eid)
        example = examples.get(eid)
        rows.append([
            md.link(titles.get(eid, eid), relative(page, explainer_page(eid))),
            md.code(eid),
            md.cell(state),
            md.link("report", relative(page, example.report)) if example and example.report else "&ndash;",
            md.seconds(example.seconds) if example else "&ndash;",
        ])
    return rows


def render_leaf(leaf: "Leaf", path_names: list[str], examples: dict[str, ExampleResult],
                titles: dict[str, str], perspective_id: str, figure_name: str | None = None) -> str:
    """A leaf's page; ``figure_name`` is the survey's figure its box and reference numbers are in."""
    page = leaf_page(leaf.id)
    crumbs = [md.link(path_names[0], relative(page, perspective_page(perspective_id)))]
    crumbs += [md.text(name) for name in path_names[1:-1]]
    done = sum(_status(e) == "implemented" for e in leaf.explainers)
    parts = [
        f"# {md.text(leaf.name)}",
        "",
        " &rsaquo; ".join(crumbs) + f" &rsaquo; **{md.text(leaf.name)}** &middot; leaf {md.code(leaf.id)}"
        f" &middot; {done}/{len(leaf.explainers)} explainers implemented",
        "",
        md.text(leaf.description),
        "",
    ]
    if leaf.runnable_as:
        parts += [f"**Runnable as:** {md.text(leaf.runnable_as)}", ""]
    if leaf.runnable_refs:
        named = "; ".join(f"{md.text(r.name)} ({r.year}, {md.arxiv_link(r.arxiv)})" if r.arxiv
                          else f"{md.text(r.name)} ({r.year})" for r in leaf.runnable_refs)
        parts += [f"**Runnable-as references:** {named}. The survey is not known to cite these; they are "
                  "what the explainers run, not methods of this leaf.", ""]
    refs = ", ".join(md.text(f"[{n}]") for n in leaf.survey_refs)
    figure = f" as printed in this leaf's box of the survey's {md.text(figure_name)}" if figure_name else ""
    parts += [f"**Survey references:** {refs} (numbers in the survey's bibliography,{figure})", ""]

    parts += ["## Methods the survey cites", ""]
    if leaf.methods:
        parts.append(md.table(
            ["Method", "Year", "Paper", "Status", "Where in the survey", "Note"],
            [[md.cell(m.name), str(m.year), md.arxiv_link(m.arxiv), md.cell(m.confidence),
              md.cell(m.source) if m.source else "&ndash;", md.cell(m.note)]
             for m in leaf.methods],
        ))
        parts += ["", "*confirmed*: the survey names the work in this leaf, at the place given; *candidate*: our "
                  "reading of a reference number, not yet checked against the survey's bibliography.", ""]
    else:
        parts += ["The survey cites no single named method for this leaf; its references are listed above.", ""]

    parts += ["## Explainers", ""]
    parts.append(md.table(["Explainer", "Id", "Status", "Example", "Cost"],
                          _explainer_rows(page, leaf, examples, titles)))
    parts.append("")
    reports = [(eid, examples[eid]) for eid in leaf.explainers if eid in examples and examples[eid].report]
    parts += ["## Example reports", ""]
    if reports:
        for eid, ex in reports:
            parts.append(f"- {md.link(titles.get(eid, eid), relative(page, ex.report))}: "
                         f"{md.text(ex.question)} &rarr; {md.code(ex.answer)}")
    else:
        parts.append("No example report in this build: none of this leaf's explainers that run on one "
                     "sample is implemented yet, or the build was run without them.")
    parts.append("")
    return "\n".join(parts)


def render_perspective(p: "Perspective", titles: dict[str, str]) -> str:
    page = perspective_page(p.id)
    parts = [f"# {md.text(p.name)}", ""]
    if p.description:
        parts += [md.text(p.description), ""]
    for group, description, leaves in _leaf_groups(p):
        if group:
            parts += [f"## {md.text(group)}", ""]
            if description:
                parts += [md.text(description), ""]
        rows = []
        for leaf in leaves:
            done = [e for e in leaf.explainers if _status(e) == "implemented"]
            rows.append([
                md.link(leaf.name, relative(page, leaf_page(leaf.id))),
                md.cell(leaf.description),
                f"{len(done)}/{len(leaf.explainers)}",
                ", ".join(md.link(titles.get(e, e), relative(page, explainer_page(e))) for e in done) or "&ndash;",
            ])
        parts += [md.table(["Leaf", "What it covers", "Implemented", "Runnable now"], rows), ""]
    return "\n".join(parts)


def render_index(cat: "Catalog", coverage: dict[str, int]) -> str:
    s = cat.survey
    page = TAXONOMY_INDEX
    parts = [
        "# Taxonomy",
        "",
        f"The survey *{md.text(s.title)}* ({md.text(s.authors)}, {s.year}, {md.arxiv_link(s.arxiv)}) sorts "
        "explanations of multimodal language models by what they look at. Each leaf below is tied to the "
        "explainers of xmllm that put it into practice.",
        "",
    ]
    n = len(cat.leaves())
    if s.taxonomy_figure:
        figure = md.text(s.taxonomy_figure)
        parts += [
            f"**Source of the tree:** the survey's {figure}. The {len(cat.perspectives)} perspectives, the {n} "
            f"leaves and each leaf's survey reference numbers match {figure}, box for box; the reference "
            "numbers on every leaf page are the ones printed in that leaf's box.",
            "",
        ]
    parts += [
        f"**Coverage:** {coverage['leaves_covered']}/{coverage['leaves_total']} leaves have at least one "
        f"implemented explainer; {coverage['explainers_implemented']}/{coverage['explainers_total']} explainers "
        "are implemented.",
        "",
        "## Two words",
        "",
        f"- **Interpretability:** {md.text(cat.terms.interpretability)}",
        f"- **Explainability:** {md.text(cat.terms.explainability)}",
        "",
    ]
    for p in cat.perspectives:
        parts += [f"## {md.link(p.name, relative(page, perspective_page(p.id)))}", ""]
        if p.description:
            parts += [md.text(p.description), ""]
        for group, _description, leaves in _leaf_groups(p):
            for leaf in leaves:
                label = f"{group} › {leaf.name}" if group else leaf.name
                parts.append(f"- {md.link(label, relative(page, leaf_page(leaf.id)))}")
        parts.append("")
    return "\n".join(parts)


def generate(examples: dict[str, ExampleResult], titles: dict[str, str], catalog: Any = None) -> SiteOutput:
    """Every taxonomy page, and the nav section that replaces ``generated/taxonomy/index.md``."""
    from xmllm.catalog import coverage, load_catalog

    cat = catalog if catalog is not None else load_catalog()
    out = SiteOutput()
    out.add(TAXONOMY_INDEX, render_index(cat, coverage(cat)))
    nav: list[Any] = [{"Overview": TAXONOMY_INDEX}]
    paths = {leaf.id: names for names, leaf in cat.iter_leaves()}
    for p in cat.perspectives:
        out.add(perspective_page(p.id), render_perspective(p, titles))
        section: list[Any] = [{nav_title(p.name): perspective_page(p.id)}]
        for group, _description, leaves in _leaf_groups(p):
            for leaf in leaves:
                out.add(leaf_page(leaf.id), render_leaf(leaf, paths[leaf.id], examples, titles, p.id,
                                                        cat.survey.taxonomy_figure))
                label = f"{group}: {leaf.name}" if group else leaf.name
                section.append({nav_title(label): leaf_page(leaf.id)})
        nav.append({nav_title(p.name): section})
    out.nav[TAXONOMY_INDEX] = nav
    return out
