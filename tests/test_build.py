"""``xmllm build`` end to end: a small real build (random-weight demo model, 4 pairs, 3
explainers) into a temporary folder, built twice; and ``xmllm serve`` on its output."""
from __future__ import annotations

import json
import threading
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from xmllm.catalog import load_catalog
from xmllm.build import BUILD_MARKER, SECOND_PROCESS_STEP

ROOT = Path(__file__).resolve().parents[1]
from xmllm.cache import weights_fingerprint
from xmllm.cli import main
from xmllm.commands.serve import make_server
from xmllm import XmllmError
from sitebuild import SMALL_EXPLAINERS, SMALL_PAIRS, small_site  # noqa: F401  (fixture)

RESOURCE_ATTRS = {("script", "src"), ("link", "href"), ("img", "src"), ("iframe", "src"), ("source", "src"),
                  ("embed", "src"), ("object", "data")}


class Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.resources: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if value is None:
                continue
            if (tag, name) in RESOURCE_ATTRS:
                self.resources.append(value)
            if tag == "a" and name == "href":
                self.links.append(value)


def refs(path: Path) -> Refs:
    r = Refs()
    r.feed(path.read_text(encoding="utf-8"))
    return r


def test_build_writes_the_whole_site(small_site) -> None:  # noqa: F811
    out = small_site.out
    first = small_site.first
    assert first.failures == {} and first.warnings == []
    assert first.examples == len(SMALL_EXPLAINERS)
    assert (out / "index.html").is_file() and (out / BUILD_MARKER).is_file()
    index = json.loads((out / "search" / "search_index.json").read_text(encoding="utf-8"))
    titles = {doc["title"] for doc in index["docs"]}
    assert (out / "search" / "search_index.js").read_text(encoding="utf-8").startswith("var __index = ")
    for _, leaf in load_catalog().iter_leaves():
        assert (out / "generated" / "taxonomy" / f"{leaf.id}.html").is_file(), leaf.id
    assert "Input &amp; Output" in titles or "Input & Output" in titles
    for eid in SMALL_EXPLAINERS:
        report = out / "reports" / f"{eid}.html"
        assert report.is_file() and report.stat().st_size > 1000
        assert (out / "generated" / "explainers" / f"{eid}.html").is_file()
        group = eid.partition(".")[0]  # each page names the explainer's group
        assert f"group <code>{group}</code>" in (out / "generated" / "explainers" / f"{eid}.html").read_text("utf-8")
        assert f"&middot; group {group}</p>" in report.read_text("utf-8")
    gallery = refs(out / "generated" / "gallery.html")
    assert {f"../reports/{eid}.html" for eid in SMALL_EXPLAINERS} <= set(gallery.links)


def test_every_local_link_resolves_and_nothing_is_loaded_from_the_web(small_site) -> None:  # noqa: F811
    out = small_site.out
    pages = sorted(out.rglob("*.html"))
    assert len(pages) > 40
    for page in pages:
        r = refs(page)
        for url in r.resources:
            assert urlparse(url).scheme in ("", "data") and not url.startswith("//"), \
                f"{page.relative_to(out)} loads {url[:80]}"
        if page.parent.name == "reports" or page.name == "404.html":
            continue  # reports' links are their renderer's; 404.html links from the server root by design
        for url in r.links:
            parts = urlparse(url)
            if parts.scheme or url.startswith("#") or not parts.path:
                continue
            target = (page.parent / unquote(parts.path)).resolve()
            assert target.exists(), f"{page.relative_to(out)} links to missing {url}"


def test_second_build_reuses_every_result_and_takes_a_fifth_of_the_time(small_site) -> None:  # noqa: F811
    first, second = small_site.first, small_site.second
    assert first.cache_misses > 0 and first.model_loaded
    assert second.cache_misses == 0 and not second.model_loaded and second.mkdocs_skipped
    # each example's run and its rendered report, the whole case study and its plot; nothing below
    # the whole study is looked up again
    assert second.cache_hits == 2 * len(SMALL_EXPLAINERS) + 2
    assert second.case_study == first.case_study
    assert SECOND_PROCESS_STEP not in second.steps  # read whole: no second process, no torch
    assert small_site.second_seconds <= small_site.first_seconds / 5, (small_site.first_seconds, small_site.second_seconds)
    # the cache key's weights hash is the one the loader records
    run = next(p for p in small_site.cache.rglob("manifest.json"))
    manifest = json.loads(run.read_text(encoding="utf-8"))
    assert manifest["model"]["weights_sha256"] == weights_fingerprint(str(small_site.model))


def test_case_study_has_numbers_for_every_pair(small_site) -> None:  # noqa: F811
    out = small_site.out
    study = json.loads((out / "generated" / "casestudy" / "results.json").read_text(encoding="utf-8"))
    res = study["results"]
    assert res["pairs"] == SMALL_PAIRS and res["samples"] == 2 * SMALL_PAIRS
    assert res["accuracy"]["n"] == 2 * SMALL_PAIRS and res["pair_accuracy"]["n"] == SMALL_PAIRS
    for s in study["samples"]:
        assert s["image_share"] is None or 0.0 <= s["image_share"] <= 1.0
        if s["image_share"] is not None:
            assert s["image_share"] + s["text_share"] == pytest.approx(1.0, abs=1e-5)
    kinds = {e["kind"] for e in study["edits"]}
    assert kinds == {"rephrase", "recolour"}
    assert all(not e["expected_changed"] for e in study["edits"] if e["kind"] == "rephrase")
    assert res["flips"]["rephrase"]["answer_changed"]["n"] == sum(e["kind"] == "rephrase" for e in study["edits"])
    page = (out / "generated" / "casestudy.html").read_text(encoding="utf-8")
    assert "Pair accuracy" in page and "casestudy/image-share.svg" in page
    assert set(res["question_types"]) == {s["question_type"] for s in study["samples"]}
    assert "Per question type" in page
    assert (out / "generated" / "casestudy" / "image-share.svg").read_text(encoding="utf-8").lstrip().startswith("<?xml")
    assert study["model"]["weights_sha256"] == weights_fingerprint(str(small_site.model))


def test_serve_serves_the_built_site_on_localhost(small_site, tmp_path) -> None:  # noqa: F811
    server = make_server(small_site.out, 0)
    host, port = server.server_address[:2]
    assert host == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=30) as resp:
            assert resp.status == 200 and b"xmllm" in resp.read()
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(XmllmError, match="no index.html"):
        make_server(tmp_path, 0)


def test_build_and_serve_command_line_errors_are_one_line(tmp_path, capsys) -> None:
    assert main(["build", "--pairs", "0", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "xmllm: error: --pairs must be a positive integer, got 0"
    assert main(["serve", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no index.html" in err
    assert not (tmp_path / "o").exists()


def test_a_model_that_cannot_load_stops_the_build_and_writes_nothing(tmp_path) -> None:
    from xmllm.build import BuildOptions, build_site
    from sitebuild import site_source_files

    before = site_source_files()
    with pytest.raises(XmllmError, match=r"^--model .*nope.*does not exist"):
        build_site(BuildOptions(out=tmp_path / "public", model=str(tmp_path / "nope"), pairs=1,
                                cache=tmp_path / "cache", progress=False))
    assert not (tmp_path / "public").exists()
    assert site_source_files() == before
    assert list((tmp_path / "cache" / "scratch").iterdir()) == []


def test_the_site_has_the_python_api_page_and_the_notebook(small_site) -> None:
    """The API page is generated from the docstrings (mkdocstrings) and lists every public
    function of xmllm.api; the example notebook is rendered, and downloadable."""
    import xmllm.api

    api = (small_site.out / "api.html").read_text(encoding="utf-8")
    for name in xmllm.api.__all__:
        anchor = f'id="xmllm.api.{name}"'
        assert anchor in api, name
        section = api.split(anchor, 1)[1].split('id="xmllm.', 1)[0]
        assert "<p>" in section, f"{name}: its docstring is not on the page"
    for obj in ("xmllm.report.explained.Run", "xmllm.explainers.explanation.Explanation",
                "xmllm.explainers.registry.Explainer", "xmllm.explainers.params.param"):
        assert f'id="{obj}"' in api, obj
    notebook = (small_site.out / "generated" / "notebook.html").read_text(encoding="utf-8")
    assert "xmllm.explain" in notebook and 'href="../notebook.ipynb"' in notebook
    assert (small_site.out / "notebook.ipynb").read_bytes() == (ROOT / "site" / "notebook.ipynb").read_bytes()
    index = (small_site.out / "index.html").read_text(encoding="utf-8")
    assert 'href="api.html"' in index and 'href="generated/notebook.html"' in index
