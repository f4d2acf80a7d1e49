"""The report's "Why, at a glance" panel as a reader sees it in Debian's Chromium: no cell of the panel
is narrower than its content (the agreement matrix used to squeeze its last column to one letter a
line), five explainers fit one screen, and the small maps are drawn over the image as the sections'
overlays are.

The report comes from a real run of the trained demo model with five cheap image-map explainers,
built once for the module. Needs Playwright and /usr/bin/chromium for the browser checks; never
downloads a browser. Screenshots of the panel are kept in test-artifacts/ (git-ignored).
"""
from __future__ import annotations

import base64
import io
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from html_tree import parse
from PIL import Image, ImageOps

import xmllm
from xmllm.explainers.demo.samples import generate_samples
from xmllm.explainers.metrics import primary_image_map
from xmllm.report.summary import _thumb

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
LOCAL_SCHEMES = {"file", "data", "blob"}
IDS = ["attention.rollout", "gradient.saliency", "gradient.input_x_gradient", "relevancy.chefer",
       "perturbation.occlusion"]
PARAMS = {"perturbation.occlusion": {"window": 2}}
SCREEN = 900
"""Height of the window the panel must fit, at 1280 px wide."""

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Every th/td of the panel: its text, and whether its content overflows it (scrollWidth > clientWidth).
CELLS_JS = """() => {
  const panel = document.getElementById('why');
  const cells = Array.from(panel.querySelectorAll('th, td'));
  const table = document.getElementById('why-agreement');
  const box = panel.querySelector('.agreement-box');
  return {
    count: cells.length,
    squeezed: cells.filter(c => c.scrollWidth > c.clientWidth)
                   .map(c => [c.textContent.trim(), c.scrollWidth, c.clientWidth]),
    tallest: Math.max(...cells.map(c => c.getBoundingClientRect().height)),
    line: parseFloat(getComputedStyle(table.querySelector('td')).lineHeight),
    panel: panel.getBoundingClientRect().height,
    panelOverflow: panel.scrollWidth - panel.clientWidth,
    box: [box.scrollWidth, box.clientWidth],
  };
}"""

# Grow the real matrix in the page to every registered explainer (26): clone its rows and numeric
# cells, so the page's own CSS lays out the largest matrix a run can have.
GROW_JS = """(labels) => {
  const table = document.getElementById('why-agreement');
  const head = table.tHead.rows[0], body = table.tBodies[0];
  const n = labels.length, had = body.rows.length;
  for (let i = head.cells.length - 1; i < n; i++) {
    const th = head.cells[1].cloneNode(true); th.textContent = String(i + 1); head.appendChild(th);
  }
  for (let i = had; i < n; i++) body.appendChild(body.rows[0].cloneNode(true));
  Array.from(body.rows).forEach((row, i) => {
    row.cells[0].querySelector('.idx').textContent = String(i + 1);
    row.cells[0].querySelector('code').textContent = labels[i];
    while (row.cells.length < n + 1) row.appendChild(row.cells[1].cloneNode(true));
    for (let j = 1; j <= n; j++) row.cells[j].textContent = (i === j - 1) ? '1.00' : '-0.88';
  });
}"""


@pytest.fixture(scope="module")
def run():
    model = xmllm.load_model("demo", device="cpu")
    sample = generate_samples(1, seed=0, question_types=["colour"])[0]
    return xmllm.explain(model, sample.image(), sample.text, IDS, params=PARAMS)


@pytest.fixture(scope="module")
def report(run, tmp_path_factory) -> Path:
    return run.save(tmp_path_factory.mktemp("why-run")) / "report.html"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM))
        yield chromium
        chromium.close()


def _open(browser, report: Path, width: int, outside: list[str]):
    """The report in a ``width`` x 900 window; every request off the file is refused and recorded."""
    def route(r) -> None:
        if urlparse(r.request.url).scheme in LOCAL_SCHEMES:
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page = browser.new_page(viewport={"width": width, "height": SCREEN})
    page.route("**/*", route)
    page.goto(report.as_uri())
    page.wait_for_selector("#why-agreement")
    return page


@pytest.mark.browser
@pytest.mark.parametrize("width", [1280, 800])
def test_no_cell_of_the_panel_is_narrower_than_its_content(browser, report, width) -> None:
    outside: list[str] = []
    page = _open(browser, report, width, outside)
    try:
        got = page.evaluate(CELLS_JS)
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("#why").screenshot(path=str(ARTIFACTS / f"why-panel-{width}.png"))
    finally:
        page.close()
    assert got["count"] == (len(IDS) + 1) ** 2  # the matrix with its header row and column: all of it checked
    assert got["squeezed"] == []
    assert got["tallest"] < 2 * got["line"]  # every header and number on one line
    assert got["panelOverflow"] <= 0  # nothing sticks out of the card
    assert got["box"][0] <= got["box"][1]  # five explainers need no scrolling, even at 800 px
    assert got["panel"] <= SCREEN, f"the panel is {got['panel']:.0f} px tall at {width} px wide"
    assert outside == []


@pytest.mark.browser
@pytest.mark.parametrize("width", [1280, 800])
def test_a_matrix_of_every_registered_explainer_scrolls_in_its_own_box(browser, report, width) -> None:
    from xmllm.explainers.registry import registered

    labels = sorted(registered())
    assert len(labels) >= 26
    page = _open(browser, report, width, [])
    try:
        page.evaluate(GROW_JS, labels[:26])
        got = page.evaluate(CELLS_JS)
    finally:
        page.close()
    assert got["count"] == 27 ** 2
    assert got["squeezed"] == []
    assert got["tallest"] < 2 * got["line"]
    assert got["panelOverflow"] <= 0  # the page does not widen: the matrix scrolls inside its box
    assert got["box"][0] > got["box"][1]


def _thumbs(html: str) -> dict[str, Image.Image]:
    out = {}
    for figure in parse(html).find(id="why-maps").find_all("figure"):
        src = figure.find("img").attrs["src"]
        out[figure.attrs["data-explainer"]] = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
    return out


def _differ(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference of two pictures (0..255), the second resized to the first."""
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b.resize(a.size), np.float64)).mean())


def test_the_small_maps_are_drawn_over_the_image(run) -> None:
    thumbs = _thumbs(run.report_html())
    assert list(thumbs) == IDS
    image = run.images[0]
    region = run.manifest["layouts"][0]["grids"][0]["region"]
    for eid in IDS:
        values = np.asarray(primary_image_map(run[eid]).values, dtype=np.float64)
        # the report's thumb is this map over this image ...
        same = Image.open(io.BytesIO(base64.b64decode(_thumb(values, image, region)[0].split(",", 1)[1]))).convert("RGB")
        assert _differ(thumbs[eid], same) == 0.0, eid
        # ... and what is under the map is the picture: mirror the picture, keep the map, and the thumb changes
        mirrored = _thumb(values, ImageOps.mirror(image), region)[0]
        other = Image.open(io.BytesIO(base64.b64decode(mirrored.split(",", 1)[1]))).convert("RGB")
        assert _differ(thumbs[eid], other) > 2.0, eid
        # and the grid alone looks different again
        alone = Image.open(io.BytesIO(base64.b64decode(_thumb(values, None, None)[0].split(",", 1)[1]))).convert("RGB")
        assert _differ(thumbs[eid], alone) > 2.0, eid
