"""A real report opened in Debian's Chromium: no console error, no request off the file, and
the controls really change what is plotted (read back from the live Bokeh document).

Needs Playwright and /usr/bin/chromium; never downloads a browser. The screenshot is kept
as a test artifact in test-artifacts/ (git-ignored).
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest


from report_runs import ANSWER_TOKENS, make_run

from xmllm.explainers.explanation import load_explanations
from xmllm.report.explained import write_report
from xmllm.report.slabs import MANTISSA_BITS

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
LOCAL_SCHEMES = {"file", "data", "blob"}
IDLE_TIMEOUT_MS = 120_000
"""Bokeh lays out every figure before the document is idle; slow on a loaded 2-core machine."""
MISSING = "#d9d9d9"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
if not CHROMIUM.exists():
    pytest.skip(f"Debian's Chromium is not installed at {CHROMIUM} (apt-get install chromium)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    make_run(out, ids=("attention.raw", "perturbation.occlusion", "relevancy.modality"))
    return write_report(out)


@pytest.fixture(scope="module")
def opened(report):
    """The report open in Chromium, with every console error and every request recorded."""
    errors: list[str] = []
    requests: list[str] = []
    blocked: list[str] = []

    def route(r) -> None:
        url = r.request.url
        if urlparse(url).scheme in LOCAL_SCHEMES:
            r.continue_()
        else:
            blocked.append(url)
            r.abort()

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM))
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.route("**/*", route)
        page.goto(report.as_uri())
        page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].is_idle",
                               timeout=IDLE_TIMEOUT_MS)
        yield page, errors, requests, blocked
        browser.close()


def _data(page, name: str, column: str) -> list:
    return page.evaluate(
        "([name, column]) => Array.from(Bokeh.documents[0].get_model_by_name(name).data[column])", [name, column])


def _saved(report: Path) -> dict:
    run = report.parent
    return {e.explainer: e for e in load_explanations(run / "explanations.npz", run / "manifest.json")}


def test_opens_without_errors_or_outside_requests(opened, report) -> None:
    page, errors, requests, blocked = opened
    assert page.evaluate("() => document.documentElement.className") == "js"
    assert not errors, errors
    assert not blocked, blocked
    assert all(urlparse(u).scheme in LOCAL_SCHEMES for u in requests), requests
    assert report.as_uri() in requests


def test_layer_control_changes_the_plotted_map(opened, report) -> None:
    page, errors, _, _ = opened
    raw = _saved(report)["attention.raw"].maps["image"]  # (T, L, H, rows, cols)
    last, before = raw.shape[1] - 1, _data(page, "attention.raw:image:cells", "value")
    np.testing.assert_allclose(before, raw[0, last].mean(axis=0).ravel(), rtol=2.0 ** -MANTISSA_BITS)
    _focus_slider(page, "attention.raw:control:layer")
    page.keyboard.press("ArrowLeft")  # the slider starts on the last layer
    page.wait_for_function("() => Bokeh.documents[0].get_model_by_name('attention.raw:control:layer').value === %d"
                           % (last - 1))
    page.wait_for_function("""([name, before]) => Bokeh.documents[0].get_model_by_name(name).data.value
        .some((v, i) => v !== before[i])""", arg=["attention.raw:image:cells", before])  # callbacks run async
    after = _data(page, "attention.raw:image:cells", "value")
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, raw[0, last - 1].mean(axis=0).ravel(), rtol=2.0 ** -MANTISSA_BITS)
    shown = page.evaluate("""() => Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name(
        'attention.raw:control:layer')).shadow_el.textContent""")
    assert f"layer: {last - 1}" in shown  # the slider shows the layer's number
    assert not errors, errors


def test_clicking_a_patch_colours_the_answer_tokens(opened, report) -> None:
    page, errors, _, _ = opened
    strip = "attention.raw:image:strip"
    assert _data(page, strip, "colour") == [MISSING] * ANSWER_TOKENS
    row, col = 1, 2
    page.evaluate("""() => Bokeh.index.find_one(
        Bokeh.documents[0].get_model_by_name('attention.raw:image:figure')).el.scrollIntoView()""")
    point = page.evaluate("""([row, col]) => {
        const doc = Bokeh.documents[0];
        const src = doc.get_model_by_name('attention.raw:image:cells');
        const view = Bokeh.index.find_one(doc.get_model_by_name('attention.raw:image:figure'));
        const i = src.data.row.findIndex((r, k) => r === row && src.data.col[k] === col);
        const box = view.canvas_view.el.getBoundingClientRect();
        return {x: box.left + view.frame.x_scale.compute(src.data.x[i]),
                y: box.top + view.frame.y_scale.compute(src.data.y[i])};
    }""", [row, col])
    page.mouse.click(point["x"], point["y"])
    page.wait_for_function("(name) => Bokeh.documents[0].get_model_by_name(name).data.colour[0] !== '%s'" % MISSING,
                           arg=strip)
    colours, values = _data(page, strip, "colour"), _data(page, strip, "value")
    assert MISSING not in colours
    raw = _saved(report)["attention.raw"].maps["image"]
    layer = page.evaluate("() => Bokeh.documents[0].get_model_by_name('attention.raw:control:layer').value")
    expected = raw[:, layer].mean(axis=1)[:, row, col]  # every answer token, mean head, the clicked patch
    np.testing.assert_allclose(values, expected, rtol=2.0 ** -MANTISSA_BITS)
    title = page.evaluate("""() => Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name(
        'attention.raw:image:strip-figure')).model.title.text""")
    assert title.startswith(f"patch row {row}, col {col}")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
    assert not errors, errors


def _focus_slider(page, name: str) -> None:
    """Keyboard focus on a Bokeh slider's handle (noUiSlider), found through the model's view."""
    handle = page.evaluate_handle("""(name) => Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name(name))
        .shadow_el.querySelector('.noUi-handle')""", name)
    handle.as_element().focus()


def test_opacity_control_reaches_every_overlay(opened) -> None:
    page, errors, _, _ = opened
    overlay_alpha = """(name) => Bokeh.documents[0].get_model_by_name(name).renderers
        .filter(r => r.glyph.type === 'Rect').map(r => r.glyph.fill_alpha.value ?? r.glyph.fill_alpha)"""
    before = page.evaluate(overlay_alpha, "perturbation.occlusion:image:figure")
    _focus_slider(page, "perturbation.occlusion:control:opacity")
    for _ in range(4):
        page.keyboard.press("ArrowLeft")
    page.wait_for_function(f"(name) => ({overlay_alpha})(name)[0] < {before[0] - 0.1}",
                           arg="perturbation.occlusion:image:figure")
    after = page.evaluate(overlay_alpha, "perturbation.occlusion:image:figure")
    value = page.evaluate("() => Bokeh.documents[0].get_model_by_name('perturbation.occlusion:control:opacity').value")
    assert after == [pytest.approx(value)] and value == pytest.approx(before[0] - 4 * 0.05)
    assert not errors, errors
