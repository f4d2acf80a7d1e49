"""The gallery: every example report of the build, with what it explains and what it cost."""
from __future__ import annotations

from . import markdown as md
from .pages import GENERATED, ExampleResult, SiteOutput, explainer_page, relative

GALLERY_PAGE = f"{GENERATED}/gallery.md"
SAMPLE_IMAGE = f"{GENERATED}/gallery/sample.png"


def render(examples: dict[str, ExampleResult], titles: dict[str, str], image: bool, quick: bool) -> str:
    from .casestudy import CASESTUDY_PAGE

    page = GALLERY_PAGE
    parts = ["# Gallery", ""]
    if quick or not examples:
        parts += ["This build ran no model (`xmllm build --quick`, or no explainer selected), so it has no "
                  "example reports. Run `xmllm build` for the full site.", ""]
        return "\n".join(parts)
    parts += [
        "One self-contained report per implemented explainer, made by `xmllm build` with the embedded demo "
        "model. Each report opens on its own, offline, with the input, the answer, the maps and the run's "
        "provenance.",
        "",
    ]
    first = next((ex for ex in examples.values() if "sample" in ex.manifest), None)
    if first is not None:
        if image:
            parts += [f"![The example sample: {md.text(first.question)}]({relative(page, SAMPLE_IMAGE)})"
                      '{ width="256" style="image-rendering: pixelated" }', ""]
        parts += [
            f"Examples on one sample explain {md.code(first.sample_id)}: *{md.text(first.question)}* "
            f"(expected {md.code(first.expected)}; the model answered {md.code(first.answer)}).",
            "",
        ]
    groups = (("On one sample", lambda ex: "sample" in ex.manifest),
              ("On a sample set", lambda ex: "sample" not in ex.manifest))
    for heading, belongs in groups:
        rows = [[
            md.link(titles.get(eid, eid), relative(page, explainer_page(eid))),
            md.link("open report", relative(page, ex.report)) if ex.report else "not rendered",
            md.cell(ex.question),
            md.code(ex.answer) if ex.answer else "&ndash;",
            md.seconds(ex.seconds),
        ] for eid, ex in examples.items() if belongs(ex)]
        if rows:
            parts += [f"## {heading}", "", md.table(["Explainer", "Report", "Input", "Answer", "Cost"], rows), ""]
    parts += [f"The [case study]({relative(page, CASESTUDY_PAGE)}) puts one explainer to work on many pairs.", ""]
    return "\n".join(parts)


def generate(examples: dict[str, ExampleResult], titles: dict[str, str], sample_png: bytes | None,
             quick: bool = False) -> SiteOutput:
    out = SiteOutput()
    out.add(GALLERY_PAGE, render(examples, titles, sample_png is not None, quick))
    if sample_png is not None:
        out.add(SAMPLE_IMAGE, sample_png)
    return out
