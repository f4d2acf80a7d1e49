"""The built site in a real browser (Playwright driving Debian's Chromium, never a downloaded one),
served from 127.0.0.1 and opened as plain files: no console error, no request leaving the local
origin, and search finds a leaf. A screenshot is kept in test-artifacts/."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest

from sitebuild import ROOT, SMALL_EXPLAINERS, small_site  # noqa: F401  (fixture)

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
LEAF_NAME, LEAF_ID = "Benchmark", "data.benchmark"
PAGES = [
    "index.html",
    f"generated/taxonomy/{LEAF_ID}.html",
    "generated/taxonomy/index.html",
    "generated/explainers/relevancy.modality.html",
    "generated/casestudy.html",
    "generated/gallery.html",
    f"reports/{SMALL_EXPLAINERS[0]}.html",
]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"Debian's Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM))
        yield b
        b.close()


@pytest.fixture(scope="module")
def served(small_site):  # noqa: F811
    from xmllm.commands.serve import make_server

    server = make_server(small_site.out, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class Watch:
    """Console errors, page errors and requests that left the origin (those are aborted)."""

    def __init__(self, page, origin: str) -> None:
        self.errors: list[str] = []
        self.foreign: list[str] = []
        page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))

        def route(r) -> None:
            url = r.request.url
            if url.startswith(origin) or url.startswith("data:") or url.startswith("blob:"):
                r.continue_()
            else:
                self.foreign.append(url)
                r.abort()

        page.route("**/*", route)


def _check_site(browser, origin: str, shot: str) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    watch = Watch(page, origin)
    for path in PAGES:
        page.goto(origin + path)
        page.wait_for_load_state("load")
        assert page.title(), path
    page.goto(origin + "index.html")
    page.wait_for_load_state("load")
    page.locator("input.md-search__input").click()
    page.locator("input.md-search__input").press_sequentially(LEAF_NAME, delay=30)
    hit = page.locator(f".md-search-result__item a[href*='{LEAF_ID}.html']").first
    hit.wait_for(state="visible", timeout=30_000)
    assert LEAF_NAME in hit.inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / shot))
    hit.click()
    page.wait_for_load_state("load")
    assert urlparse(page.url).path.endswith(f"/{LEAF_ID}.html"), page.url
    assert page.locator("h1").first.inner_text().rstrip("¶ \n") == LEAF_NAME
    page.close()
    assert watch.foreign == [], f"requests left {origin}: {watch.foreign}"
    assert watch.errors == [], watch.errors


def test_served_site_works_offline_and_search_finds_a_leaf(browser, served) -> None:
    _check_site(browser, served, "site.png")
    assert (ARTIFACTS / "site.png").stat().st_size > 10_000


def test_site_works_from_plain_files(browser, small_site, tmp_path) -> None:  # noqa: F811
    folder = tmp_path / "copied site"  # a space in the path, as in a user's Downloads folder
    shutil.copytree(small_site.out, folder)
    _check_site(browser, folder.as_uri() + "/", "site-file.png")
