"""One self-contained HTML page per saved run: Jinja2 (autoescaped) around inline Bokeh.

Nothing in the page is fetched: images are data URIs, BokehJS and the page's own CSS and
script are inline, and a Content-Security-Policy forbids every other source, so the page
opens the same from a file, a mail attachment or an offline archive.

A run renders to the same bytes every time, and two runs of one command on one input differ
only in the manifest's ``created`` timestamp (shown in the header, the provenance table and the
embedded manifest): run times stay in ``manifest.json`` (``timings_seconds``), out of the page.

Text that users wrote (questions, answers, ids, file names) is shown by :func:`shown`: escaped,
control characters as visible escapes (``\x07``), inside ``<bdi>`` so that a right-to-left
override (U+202E) cannot turn the rest of the line around; a question longer than
:data:`SHOWN_LIMIT` characters is cut in the header with the full text one click away.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from markupsafe import Markup, escape

from .about import About, about, survey
from .faithfulness import FaithfulnessBlock, FaithfulnessSkip, block_for
from .figures import SectionControls
from .palettes import palettes
from .slabs import show_token
from .views import PageImages, ViewOut, plan

TEMPLATE = "report.html.j2"
CSS = "report.css"
SCRIPT = "report.js"
MAX_SAMPLE_ROWS = 200
"""Samples of a dataset-scope run listed in its page; the rest are counted."""
META_LIMIT = 20_000
"""Characters of an explanation's metadata shown in full; longer metadata is cut with a note."""
SHOWN_LIMIT = 200
"""Characters of a question (or other user text) shown in a heading or a table cell; the full
text is in a ``<details>`` element beside it."""
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
"""Characters never written raw into a page: C0 controls but tab and newline, DEL, C1 controls,
and the line and paragraph separators."""
TIME_KEYS = ("seconds",)
"""Metadata keys that hold run times: left out of the page (they differ on every run)."""


@dataclass
class Section:
    """One explainer's part of the page."""

    id: str
    anchor: str
    about: About
    params: dict[str, Any]
    scores: dict[str, Any]
    meta_json: str
    meta_cut: bool
    views: list[ViewOut] = field(default_factory=list)
    view_divs: list[str | None] = field(default_factory=list)
    controls_div: str | None = None
    warning: str | None = None
    faithfulness: FaithfulnessBlock | FaithfulnessSkip | None = None
    """Deletion and insertion of the explainer's image map on this sample (None: no image map)."""


def anchor_for(explainer_id: str) -> str:
    return "x-" + re.sub(r"[^a-z0-9]+", "-", explainer_id.lower()).strip("-")


def script_json(value: Any) -> Markup:
    """JSON safe inside a ``<script>`` element: ``<``, ``>``, ``&``, ``'``, the JavaScript line
    separators and every control character escaped, so no data can close the element, start
    markup or reach the page raw."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    for char, code in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("'", "\\u0027")):
        text = text.replace(char, code)
    return Markup(CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text))


def control_escape(char: str) -> str:
    """How a control character is shown: ``\\x07`` (``\\u2028`` above U+00FF)."""
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible_text(value: Any) -> str:
    """Plain text with control characters as escapes (for ``<title>``, attributes, ``<pre>``)."""
    return CONTROL.sub(lambda m: control_escape(m.group()), str(value))


def shown(value: Any) -> Markup:
    """User text as markup: escaped, each control character as a visible escape in a
    ``span.ctrl``, the whole in ``<bdi>`` (bidirectional isolation: an RLO in a question
    reverses at most the question, never the text around it)."""
    text = "" if value is None else str(value)
    parts, last = [], 0
    for m in CONTROL.finditer(text):
        parts.append(escape(text[last:m.start()]))
        parts.append(Markup('<span class="ctrl" title="control character U+{:04X}">{}</span>').format(
            ord(m.group()), control_escape(m.group())))
        last = m.end()
    parts.append(escape(text[last:]))
    return Markup("<bdi>{}</bdi>").format(Markup("").join(parts))


def is_long(value: Any, limit: int = SHOWN_LIMIT) -> bool:
    return value is not None and len(str(value)) > limit


def shown_cut(value: Any, limit: int = SHOWN_LIMIT) -> Markup:
    """:func:`shown` of the first ``limit`` characters, with an ellipsis when there are more."""
    text = "" if value is None else str(value)
    if len(text) <= limit:
        return shown(text)
    return Markup('{}<span class="cut" title="cut at {} of {:,} characters">\u2026</span>').format(
        shown(text[:limit]), limit, len(text))


def collapsed(value: Any, what: str = "text", limit: int = SHOWN_LIMIT) -> Markup:
    """A table cell's user text: short text as :func:`shown`; long text cut, the whole of it in a
    ``<details>`` element one click away."""
    if not is_long(value, limit):
        return shown(value)
    return Markup('{}<details class="full-text"><summary>full {} ({:,} characters)</summary>{}</details>').format(
        shown_cut(value, limit), what, len(str(value)), shown(value))


def title_text(value: Any, limit: int = SHOWN_LIMIT) -> str:
    """User text for ``<title>`` (no markup there): control characters escaped, cut at ``limit``,
    wrapped in FIRST STRONG ISOLATE ... POP DIRECTIONAL ISOLATE so that it cannot reorder the rest."""
    text = visible_text("" if value is None else value)
    if len(text) > limit:
        text = text[:limit] + "\u2026"
    return f"\u2068{text}\u2069"


@lru_cache(maxsize=1)
def environment():
    from jinja2 import Environment, FunctionLoader, StrictUndefined, select_autoescape

    from ..templates import read_template

    env = Environment(
        loader=FunctionLoader(read_template),
        autoescape=select_autoescape(enabled_extensions=("html", "htm", "xml", "j2"), default_for_string=True,
                                     default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["script_json"] = script_json
    env.filters["token"] = show_token
    env.filters["number"] = number
    env.filters["shown"] = shown
    env.filters["shown_cut"] = shown_cut
    env.filters["collapsed"] = collapsed
    env.filters["visible_text"] = visible_text
    env.filters["title_text"] = title_text
    env.tests["long"] = is_long
    env.globals["SHOWN_LIMIT"] = SHOWN_LIMIT
    env.filters["pretty_json"] = lambda value: json.dumps(value, ensure_ascii=False, default=str)
    return env


def number(value: Any) -> str:
    """Numbers as people read them: four significant digits, integers whole."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return str(value)


def render_run(run: Any) -> str:
    """The page of one :class:`xmllm.Run` (not imported here: the run renders itself through this
    module, which reads only its manifest, explanations, images and target)."""
    from bokeh.embed import components
    from bokeh.layouts import column, row

    manifest = run.manifest
    page = PageImages.build(run.images, manifest.get("layouts"))
    roots: dict[str, Any] = {}
    sections = []
    for exp in run.explanations:
        controls = SectionControls(exp.explainer)
        outs = [view.render(controls, page) for view in plan(exp)]
        meta = {k: v for k, v in exp.meta.items() if k not in TIME_KEYS}  # run times: manifest.json only
        meta_text = json.dumps(meta, indent=1, sort_keys=True, ensure_ascii=False, default=str)
        section = Section(
            exp.explainer, anchor_for(exp.explainer), about(exp.explainer), exp.params, exp.scores,
            meta_text[:META_LIMIT], len(meta_text) > META_LIMIT, outs,
            warning=exp.meta.get("warning") if isinstance(exp.meta.get("warning"), str) else None,
            faithfulness=block_for(manifest, exp.explainer),
        )
        for k, out in enumerate(outs):
            key = None
            if out.roots:
                key = f"{section.anchor}-view-{k}"
                roots[key] = column(*out.roots) if len(out.roots) > 1 else out.roots[0]
            section.view_divs.append(key)
        widgets = controls.all()
        if widgets:
            section.controls_div = f"{section.anchor}-controls"
            roots[section.controls_div] = row(*widgets, name=f"{exp.explainer}:controls")
        sections.append(section)

    script, divs = components(roots) if roots else ("", {})
    resources = bokeh_resources(any(s.controls_div for s in sections)) if roots else None
    bokeh_js = "".join(f"<script>\n{js}\n</script>\n" for js in (resources.js_raw if resources else []))
    bokeh_css = "".join(f"<style>\n{css}\n</style>\n" for css in (resources.css_raw if resources else []))
    for section in sections:
        section.view_divs = [Markup(divs[k]) if k else None for k in section.view_divs]
        section.controls_div = Markup(divs[section.controls_div]) if section.controls_div else None

    target = run.target
    sample = manifest.get("sample") or {}
    answer = answer_tokens(target, manifest)
    expected = sample.get("expected")
    samples = [x for x in manifest.get("samples") or [] if isinstance(x, dict)]
    scope = "dataset" if manifest.get("scope") == "dataset" or (samples and not sample) else "sample"
    why = None
    if scope == "sample":
        from .summary import why_panel

        why = why_panel(run)
    page = {
        "why": why,
        "anchor_for": anchor_for,
        "scope": scope,
        "samples": samples[:MAX_SAMPLE_ROWS],
        "samples_total": len(samples),
        "question": sample.get("question", ""),
        "heading": sample.get("question", "") if scope == "sample" else
        f"{', '.join(e.explainer for e in run.explanations)} over {len(samples)} samples",
        "sample": sample,
        "expected": expected,
        "correct": _correct(answer["text"], expected),
        "answer": answer,
        "images": [{"uri": src.data["url"][0], "name": name, "size": size}
                   for src, name, size in zip(page.sources, run.image_names, page.sizes)],
        "model": manifest.get("model") or {},
        "versions": manifest.get("versions") or {},
        "seed": manifest.get("seed"),
        "created": manifest.get("created"),
        "layouts": manifest.get("layouts") or [],
        "sections": sections,
        "survey": survey(),
        "manifest": {k: v for k, v in manifest.items() if k not in ("explanations", "timings_seconds")},
        "palettes": {"overlay": palettes(True), "opaque": palettes(False)},
        "css": Markup(_asset(CSS)),
        "report_js": Markup(_asset(SCRIPT)),
        "bokeh_js": Markup(bokeh_js),
        "bokeh_css": Markup(bokeh_css),
        "bokeh_script": Markup(script),
    }
    return environment().get_template(TEMPLATE).render(**page)


def bokeh_resources(widgets: bool):
    """BokehJS inline, with the widgets bundle only when the page has controls: the page's
    figures use nothing else (no tables, WebGL or maths), which keeps the file small."""
    from bokeh.resources import Resources

    return Resources(mode="inline", components=["bokeh", "bokeh-widgets"] if widgets else ["bokeh"])


def answer_tokens(target: Any, manifest: dict[str, Any]) -> dict[str, Any]:
    """The answer text and each token with its probability (from the target, else the manifest)."""
    source = manifest.get("answer") or {}
    tokens = list(getattr(target, "tokens", None) or source.get("tokens") or [])
    probs = list(getattr(target, "probs", None) or source.get("probs") or [])
    text = getattr(target, "text", None) or source.get("text", "")
    return {
        "text": text,
        "tokens": [{"text": show_token(t), "prob": float(probs[i]) if i < len(probs) else None, "index": i}
                   for i, t in enumerate(tokens)],
    }


def _correct(answer: str, expected: Any) -> bool | None:
    if not isinstance(expected, str) or not expected:
        return None
    from xmllm.explainers.answering import is_correct

    return is_correct(answer, expected)


def _asset(name: str) -> str:
    from ..templates import read_template

    return read_template(name)
