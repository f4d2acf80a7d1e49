"""One page per explainer: what it computes, its parameters, its measured cost, its papers.

Parameters are read from the signature of the explainer's ``explain`` (keyword parameters with
their defaults), so the page cannot drift from the code. Cost is the seconds measured when the
build ran the explainer's example (or when the cached run it reuses was made).
"""
from __future__ import annotations

import inspect
import json
import sys
from typing import Any

from . import markdown as md
from .pages import EXPLAINERS_DIR, ExampleResult, SiteOutput, explainer_page, leaf_page, nav_title, relative

EXPLAINERS_INDEX = f"{EXPLAINERS_DIR}/index.md"
NEED_TEXT = {
    "attention": "attention weights (the eager attention kernel)",
    "gradients": "a backward pass through the model",
    "pair": "a counterfactual partner sample",
    "labelled_set": "a sample set with ground-truth attributes",
    "checkpoints": "two checkpoints of one model",
}


def parameters(cls: type) -> list[dict[str, Any]]:
    """The explainer's declared parameters (:attr:`Explainer.Params`): name, default, accepted
    values and help, as ``xmllm explainers --json`` gives them."""
    return [spec.describe() for spec in cls.Params.specs()]


def _leaves_by_explainer(catalog: Any) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for names, leaf in catalog.iter_leaves():
        for eid in leaf.explainers:
            out.setdefault(eid, []).append((leaf.id, " › ".join(names)))
    return out


def _citation(c: dict[str, Any]) -> str:
    who = f"{md.text(c['authors'])} " if c.get("authors") else ""
    link = f" {md.arxiv_link(c['arxiv'])}" if c.get("arxiv") else ""
    return f"- {who}({c['year']}). *{md.text(c['title'])}*.{link}"


def _cost(example: ExampleResult | None) -> list[str]:
    if example is None:
        return ["Not measured in this build: the build ran no example of this explainer.", ""]
    model = example.manifest.get("model", {})
    sample = example.manifest.get("sample", {})
    rows = [
        ["Explainer", md.seconds(example.seconds)],
        ["Preparing the sample (greedy answer, final sequence)", md.seconds(example.prepare_seconds)],
        ["Model", f"{md.code(model.get('spec', '?'))} ({md.cell(model.get('parameters'))} parameters, "
                  f"{md.cell(model.get('device'))}, {md.cell(model.get('dtype'))})"],
        ["Sample", f"{md.code(sample.get('id', '?'))}: {md.cell(sample.get('question'))}"],
        ["Measured", md.cell(example.manifest.get("created"))],
    ]
    return [
        md.table(["What", "Seconds / detail"], rows),
        "",
        "Wall-clock time of one run on the example sample with the parameters' defaults, on the machine "
        "that made the cached run (CPU threads shared with whatever else ran). It grows with the number "
        "of image tokens, answer tokens and layers.",
        "",
    ]


def render_explainer(row: dict[str, Any], cls: type, example: ExampleResult | None,
                     leaves: list[tuple[str, str]], note: str | None = None) -> str:
    eid = row["id"]
    page = explainer_page(eid)
    needs = [NEED_TEXT.get(n, n) for n in row["needs"]]
    parts = [
        f"# {md.text(row['title'])}",
        "",
        f"{md.code(eid)} &middot; group {md.code(row['group'])} &middot; runs on "
        f"{'one sample' if row['scope'] == 'sample' else 'a sample set'}"
        + (f" &middot; needs {md.text(', '.join(needs))}" if needs else ""),
        "",
        md.text(row["summary"]) if row["summary"] else "",
        "",
        "## What it computes",
        "",
        md.docstring(cls.__doc__),
        "",
    ]
    module = sys.modules.get(cls.__module__)
    if module is not None and module.__doc__:
        parts += [f"### How it is computed (module {md.code(cls.__module__)})", "", md.docstring(module.__doc__), ""]
    explain_doc = md.docstring(inspect.getdoc(cls.compute) if cls.compute.__doc__ else None)
    params = parameters(cls)
    parts += ["## Parameters", ""]
    if params:
        parts.append(md.table(
            ["Name", "Default", "Accepted values", "What it sets"],
            [[md.code(p["name"]), md.code(json.dumps(p["default"])), md.cell(p["type"]), md.cell(p["help"])]
             for p in params],
        ))
        parts += ["", f"Pass them as {md.code('--param ' + eid + '.NAME=VALUE')} (the value as JSON) to "
                  f"{md.code('xmllm explain')}, as {md.code('params={' + repr(eid) + ': {...}}')} to "
                  f"{md.code('xmllm.explain')}, or under the explainer in an audit config; "
                  f"{md.code('xmllm explainers ' + eid)} lists them.", ""]
    else:
        parts += ["None.", ""]
    if explain_doc:
        parts += [explain_doc, ""]
    parts += ["## Cost", ""] + _cost(example)
    parts += ["## Citations", ""]
    parts += [_citation(c) for c in row["citations"]] or ["None recorded."]
    parts.append("")
    parts += ["## Example", ""]
    if example is not None and example.report:
        parts.append(
            f"{md.link('Example report', relative(page, example.report))} on {md.code(example.sample_id)}: "
            f"{md.text(example.question)} &rarr; the model answered {md.code(example.answer)}"
            + (f" (expected {md.code(example.expected)})." if example.expected else "."))
    elif note:
        parts.append(f"No example report in this build: {md.text(note)}.")
    else:
        parts.append("No example report in this build.")
    parts.append("")
    parts += ["## In the taxonomy", ""]
    parts += [f"- {md.link(name, relative(page, leaf_page(leaf_id)))}" for leaf_id, name in leaves] or [
        "No catalog leaf lists this explainer."]
    parts.append("")
    return "\n".join(parts)


def render_index(rows: list[dict[str, Any]], examples: dict[str, ExampleResult]) -> str:
    page = EXPLAINERS_INDEX
    done = sum(r["status"] == "implemented" for r in rows)
    table_rows = []
    for r in rows:
        ex = examples.get(r["id"])
        table_rows.append([
            md.link(r.get("title", r["id"]), relative(page, explainer_page(r["id"]))),
            md.code(r["id"]),
            md.cell(r["status"]),
            md.cell(r.get("scope")),
            md.seconds(ex.seconds) if ex else "&ndash;",
            md.link("report", relative(page, ex.report)) if ex and ex.report else "&ndash;",
        ])
    return "\n".join([
        "# Explainers",
        "",
        f"{done} of the {len(rows)} explainers the project commits to are implemented. Each runs on any "
        "supported image-text-to-text model through `xmllm explain` (one sample) and explains the model's own "
        "greedy answer on the final sequence.",
        "",
        md.table(["Explainer", "Id", "Status", "Runs on", "Cost (example)", "Example"], table_rows),
        "",
    ])


def generate(examples: dict[str, ExampleResult], catalog: Any = None,
             notes: dict[str, str] | None = None) -> SiteOutput:
    """The explainers index and one page per known or registered explainer, with their nav."""
    from xmllm.catalog import load_catalog
    from xmllm.explainers.registry import describe_all, registered

    cat = catalog if catalog is not None else load_catalog()
    rows = describe_all()
    classes = registered()
    leaves = _leaves_by_explainer(cat)
    out = SiteOutput()
    out.add(EXPLAINERS_INDEX, render_index(rows, examples))
    nav: list[Any] = [{"Overview": EXPLAINERS_INDEX}]
    for r in rows:
        out.add(explainer_page(r["id"]), render_explainer(r, classes.get(r["id"]), examples.get(r["id"]),
                                                          leaves.get(r["id"], []), (notes or {}).get(r["id"])))
        nav.append({nav_title(r["id"]): explainer_page(r["id"])})
    out.nav[EXPLAINERS_INDEX] = nav
    return out


def titles() -> dict[str, str]:
    """Explainer id to title."""
    from xmllm.explainers.registry import describe_all

    return {r["id"]: r.get("title", r["id"]) for r in describe_all()}
