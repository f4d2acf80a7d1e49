"""A run's inline view in a notebook: light (static maps, the why panel, the answer's tokens; no
BokehJS), sandboxed in its own frame without scripts, with the interactive report one call away
(``run.show(interactive=True)``). A real run of three explainers on the demo model, its HTML
parsed back, its images decoded, and the frame opened in Debian's Chromium."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from html_tree import bokeh_models, parse
from PIL import Image

import xmllm
from xmllm.explainers.demo.samples import generate_samples

THREE = ["relevancy.chefer", "gradient.integrated", "perturbation.occlusion"]
LIGHT_BYTES = 300_000
"""The bound on a three-explainer run's inline view (the interactive report is about 2 MB)."""
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def run():
    model = xmllm.load_model("demo", device="cpu")
    sample = generate_samples(1, seed=0, question_types=["colour"])[0]
    return xmllm.explain(model, sample.image(), sample.text, THREE)


def frame(markup: str):
    """The one ``<iframe>`` of an inline view, and the page inside it, parsed."""
    tree = parse(markup)
    assert [e.tag for e in tree.iter()][1:] == ["iframe"]
    iframe = tree.find("iframe")
    return iframe, parse(iframe.attrs["srcdoc"])


def png(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    image.load()
    return image


def test_three_explainers_inline_stay_under_300_kb_and_carry_no_script(run):
    markup = run._repr_html_()
    assert len(markup) < LIGHT_BYTES, f"{len(markup):,} characters inline"
    assert len(run.report_html()) > 4 * len(markup)  # the interactive report, BokehJS inline, is the heavy one
    iframe, inner = frame(markup)
    assert iframe.attrs["sandbox"] == ""  # the strictest sandbox: no scripts, no same origin, no forms
    assert inner.find_all("script") == [] and "bokeh" not in iframe.attrs["srcdoc"].lower()
    csp = [m.attrs["content"] for m in inner.find_all("meta") if m.attrs.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0] and "script-src" not in csp[0]


def test_the_inline_view_holds_the_why_panel_the_maps_and_the_token_table(run):
    _, inner = frame(run._repr_html_())
    why = inner.find(id="why")
    assert why.find(id="why-answer").text.strip() == run.answer["text"]
    thumbs = why.find(id="why-maps").find_all("figure")
    assert [f.attrs["data-explainer"] for f in thumbs] == THREE
    for figure in thumbs:
        assert png(figure.find("img").attrs["src"]).size[0] > 50
    assert why.find(id="why-agreement") is not None  # three image maps: their agreement
    rows = inner.find(id="answer-tokens").find("tbody").find_all("tr")
    assert len(rows) == len(run.answer["tokens"])
    for row, token, prob in zip(rows, run.answer["tokens"], run.answer["probs"]):
        index, shown, percent = [td.text.strip() for td in row.find_all("td")]
        assert shown == token.strip() and float(row.attrs["data-prob"]) == pytest.approx(prob, abs=1e-6)
        assert percent == f"{100 * prob:.1f}%"
    for eid in THREE:
        section = next(s for s in inner.find_all("section") if s.attrs.get("data-explainer") == eid)
        maps = [png(img.attrs["src"]) for img in section.find_all("img") if "static" in (img.attrs.get("class") or "")]
        assert maps and all(m.size[0] > 50 and m.size[1] > 50 for m in maps), eid
    assert "run.show(interactive=True)" in inner.find(id="interactive-hint").text


def test_one_explanation_inline_is_light_and_shows_only_itself(run):
    iframe, inner = frame(run["gradient.integrated"]._repr_html_())
    assert iframe.attrs["sandbox"] == "" and inner.find_all("script") == []
    assert len(iframe.attrs["srcdoc"]) < LIGHT_BYTES / 3
    assert [s.attrs["data-explainer"] for s in inner.find_all("section") if "data-explainer" in s.attrs] \
        == ["gradient.integrated"]
    assert "perturbation.occlusion" not in inner.text


def test_the_saved_run_names_its_report_in_the_inline_view(run, tmp_path):
    folder = run.save(tmp_path / "saved")
    try:
        _, inner = frame(run._repr_html_())
    finally:
        run.folder = None
    assert str(folder / "report.html") in inner.find(id="interactive-hint").text


def test_show_interactive_gives_the_bokeh_report_and_show_the_light_view(run, monkeypatch):
    pytest.importorskip("IPython")
    import IPython
    import IPython.display

    monkeypatch.setattr(IPython, "get_ipython", lambda: object())  # as in a notebook: show() displays inline
    shown: list[str] = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False: shown.append(obj["text/html"]))
    run.show(interactive=True)
    run.show()
    interactive, light = shown
    iframe, inner = frame(interactive)
    assert iframe.attrs["sandbox"] == "allow-scripts"  # scripts run, in an opaque origin of their own
    assert inner.find_all("script") and not any((s.attrs.get("src") or "").strip() for s in inner.find_all("script"))
    models = bokeh_models(iframe.attrs["srcdoc"])
    assert models and any(name.startswith(THREE[0]) for name in models)
    assert light == run._repr_html_()


@pytest.mark.browser
def test_the_inline_view_renders_its_maps_in_chromium_with_scripts_off(run, tmp_path):
    """The frame as a notebook shows it, opened in Debian's Chromium: every image decodes under
    the page's Content-Security-Policy and the sandbox, and nothing is requested off the page."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    host = tmp_path / "notebook.html"
    host.write_text(f"<!doctype html><meta charset='utf-8'><body>{run._repr_html_()}</body>", encoding="utf-8")
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(host.as_uri(), wait_until="load")
            inner = next(f for f in page.frames if f is not page.main_frame)
            sizes = inner.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
            scripted = inner.evaluate("() => document.documentElement.className")
        finally:
            browser.close()
    assert len(sizes) >= 2 * len(THREE) and all(done and width > 0 for done, width in sizes), sizes
    assert scripted == ""
    assert all(url.startswith(("file:", "data:", "about:")) for url in requests), requests
