"""Site pages: every leaf and explainer has a page, arXiv links are there, text is escaped,
and the cache keeps only complete entries. Pages are rendered with Python-Markdown (as MkDocs
does) and parsed back; the escaping test runs a real MkDocs build of a hostile catalog."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import markdown
import pytest

from xmllm.catalog import load_catalog
from xmllm.catalog.loader import DEFAULT_PATH
from xmllm.explainers.registry import describe_all, get_explainer, registered
from xmllm.build import BuildOptions, build_site, expand_nav
from xmllm.cache import RunCache, cache_key
from xmllm import XmllmError
from xmllm.site import explainers as explainer_pages
from xmllm.site import markdown as md
from xmllm.site import taxonomy
from sitebuild import site_source_files

EXTENSIONS = ["tables", "attr_list", "md_in_html", "admonition"]


class Links(HTMLParser):
    """Anchors, script elements and visible text of an HTML document."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []
        self.scripts: list[str] = []
        self.tags: list[str] = []
        self.attrs: set[str] = set()
        self.text: list[str] = []
        self.title = ""
        self._in: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.update(name for name, _ in attrs)
        self._in.append(tag)
        if tag == "a" and dict(attrs).get("href"):
            self.hrefs.append(dict(attrs)["href"])
        if tag == "script":
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag in self._in:
            while self._in and self._in.pop() != tag:
                pass

    def handle_data(self, data):
        if self._in and self._in[-1] == "script":
            self.scripts[-1] += data
        elif self._in and self._in[-1] == "title":
            self.title += data
        else:
            self.text.append(data)


def parse(html_text: str) -> Links:
    p = Links()
    p.feed(html_text)
    return p


@pytest.fixture(scope="module")
def generated():
    titles = explainer_pages.titles()
    out = taxonomy.generate({}, titles)
    out.extend(explainer_pages.generate({}))
    return {p.path: p.content for p in out.pages}, out.nav


def test_every_leaf_has_a_page_with_its_methods_arxiv_links_and_explainers(generated) -> None:
    pages, _ = generated
    cat = load_catalog()
    for _, leaf in cat.iter_leaves():
        path = taxonomy.leaf_page(leaf.id)
        assert path in pages, f"no page for leaf {leaf.id}"
        doc = parse(markdown.markdown(pages[path], extensions=EXTENSIONS))
        for method in leaf.methods:
            if method.arxiv:
                assert f"https://arxiv.org/abs/{method.arxiv}" in doc.hrefs, (leaf.id, method.name)
        for eid in leaf.explainers:
            assert f"../explainers/{eid}.md" in doc.hrefs
            assert explainer_pages.explainer_page(eid) in pages
        assert leaf.name in " ".join(doc.text)
    # leaves with cited methods exist, so the arXiv assertion above is exercised
    assert sum(bool(m.arxiv) for leaf in cat.leaves() for m in leaf.methods) >= 10


def test_every_explainer_has_a_page_with_parameters_and_citations(generated) -> None:
    pages, nav = generated
    for row in describe_all():
        path = explainer_pages.explainer_page(row["id"])
        assert path in pages
        doc = parse(markdown.markdown(pages[path], extensions=EXTENSIONS))
        for c in row["citations"]:
            if c["arxiv"]:
                assert f"https://arxiv.org/abs/{c['arxiv']}" in doc.hrefs
        html = markdown.markdown(pages[path], extensions=EXTENSIONS)
        text = " ".join(" ".join(parse(html).text).split())
        for spec in get_explainer(row["id"]).Params.specs():
            assert f"<code>{spec.name}</code>" in html and " ".join(spec.help.split()) in text, (row["id"], spec.name)
    # the relevancy.modality table holds the declared defaults, as JSON
    rel = markdown.markdown(pages[explainer_pages.explainer_page("relevancy.modality")], extensions=EXTENSIONS)
    assert re.search(r"<code>top_k</code></td>\s*<td><code>3</code>", rel)
    assert re.search(r'<code>target</code></td>\s*<td><code>"logit"</code>', rel)
    nav_targets = [next(iter(item.values())) for item in nav[explainer_pages.EXPLAINERS_INDEX][1:]]
    assert nav_targets == [explainer_pages.explainer_page(r["id"]) for r in describe_all()]


def test_parameters_come_from_the_declaration() -> None:
    cls = registered()["relevancy.modality"]
    params = {p["name"]: p for p in explainer_pages.parameters(cls)}
    assert set(params) == {"target", "top_k", "batch", "recompute"} == set(cls.Params.names())
    assert params["recompute"]["default"] == "auto" and params["recompute"]["choices"]
    assert params["top_k"]["default"] == 3 and params["top_k"]["type"] == "integer >= 1"
    assert params["target"]["choices"] and params["top_k"]["help"]


def test_text_escapes_html_and_markdown() -> None:
    hostile = "</title><script>alert(1)</script> *bold* [x](javascript:y) a|b `c` it's"
    rendered = markdown.markdown(md.text(hostile), extensions=EXTENSIONS)
    doc = parse(rendered)
    assert "script" not in doc.tags and "em" not in doc.tags and "a" not in doc.tags and "code" not in doc.tags
    assert "".join(doc.text) == hostile
    # in a table cell the pipe stays text and does not split the cell
    table = markdown.markdown(md.table(["A", "B"], [[md.cell(hostile), "2"]]), extensions=EXTENSIONS)
    assert table.count("<td>") == 2
    assert md.text("1. not a list") == "1\\. not a list"
    with pytest.raises(ValueError):
        md.arxiv_url("javascript:alert(1)")


def test_expand_nav_puts_sections_in_and_drops_missing_generated_pages() -> None:
    nav = [{"Home": "index.md"}, {"Taxonomy": "generated/taxonomy/index.md"},
           {"Trust": "generated/trust.md"}, {"Usage": "usage.md"}]
    got = expand_nav(nav, {"generated/taxonomy/index.md": ["generated/taxonomy/index.md", {"Leaf": "generated/taxonomy/a.md"}]},
                     exists=lambda p: p != "generated/trust.md")
    assert got == [{"Home": "index.md"},
                   {"Taxonomy": ["generated/taxonomy/index.md", {"Leaf": "generated/taxonomy/a.md"}]},
                   {"Usage": "usage.md"}]


def test_cache_keeps_only_complete_entries(tmp_path) -> None:
    cache = RunCache(tmp_path / "cache")
    key = cache_key("w", "s", "e", {"a": 1})
    assert key != cache_key("w", "s", "e", {"a": 2}) != cache_key("w2", "s", "e", {"a": 1})
    assert cache_key("w", "s", "e", {"a": 1, "b": 2}) == cache_key("w", "s", "e", {"b": 2, "a": 1})
    assert key != cache_key("w", "s", "e", {"a": 1}, version="0.0.0")

    def broken(folder: Path) -> None:
        (folder / "half.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cache.get_or_build(key, broken)
    assert cache.get(key) is None
    assert list(cache.path(key).parent.iterdir()) == [], "a failed build left files in the cache"

    calls = []

    def good(folder: Path) -> None:
        calls.append(1)
        (folder / "data.txt").write_text("ok")

    first = cache.get_or_build(key, good)
    second = cache.get_or_build(key, good)
    assert first == second and (first / "data.txt").read_text() == "ok" and len(calls) == 1
    assert (cache.hits, cache.misses) == (1, 2)
    assert RunCache(tmp_path / "cache", enabled=False).get(key) is None


HOSTILE_NAME = "Input </title><script>alert('leaf')</script> Output"
HOSTILE_DESCRIPTION = "Ties <img src=x onerror=alert(2)> an answer *to* [a link](javascript:alert(3))."


def test_quick_build_of_a_hostile_catalog_shows_its_text_and_runs_none_of_it(tmp_path) -> None:
    """A real MkDocs build (no model): names and descriptions with markup come out as text,
    in the page body, the menu and the <title>."""
    text = DEFAULT_PATH.read_text(encoding="utf-8")
    text = text.replace("name: Input & Output", f'name: "{HOSTILE_NAME}"', 1)
    first_desc = re.search(r"description: >-\n((?:          .*\n)+)", text)
    text = text.replace(first_desc.group(0), f"description: '{HOSTILE_DESCRIPTION}'\n", 1)
    hostile = tmp_path / "taxonomy.yaml"
    hostile.write_text(text, encoding="utf-8")
    before = site_source_files()
    summary = build_site(BuildOptions(out=tmp_path / "public", quick=True, catalog=hostile,
                                      cache=tmp_path / "cache", progress=False))
    assert summary.warnings == [] and not summary.model_loaded and summary.examples == 0

    leaf_html = (tmp_path / "public" / "generated" / "taxonomy" / "data.input-output.html").read_text(encoding="utf-8")
    doc = parse(leaf_html)
    assert not any("alert" in s for s in doc.scripts), "catalog text ran as a script"
    assert "onerror" not in doc.attrs
    visible = " ".join(doc.text)
    assert HOSTILE_NAME in visible
    assert "Ties <img src=x onerror=alert(2)> an answer *to* [a link](javascript:alert(3))." in " ".join(visible.split())
    assert "javascript:" not in " ".join(doc.hrefs)
    assert HOSTILE_NAME in doc.title
    # every built page: no element came from the payload
    for page in (tmp_path / "public").rglob("*.html"):
        built = parse(page.read_text(encoding="utf-8"))
        assert not any("alert(" in s for s in built.scripts) and "onerror" not in built.attrs, page
    # nothing was written into the checkout's MkDocs sources, nor left in the cache's scratch folder
    assert site_source_files() == before
    assert list((tmp_path / "cache" / "scratch").iterdir()) == []


def test_build_refuses_an_output_folder_that_is_not_a_site(tmp_path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(XmllmError, match="not a site built by xmllm"):
        build_site(BuildOptions(out=out, quick=True, progress=False))
    assert (out / "thesis.tex").read_text() == "precious"


def test_example_builders_are_chosen_by_id_then_scope() -> None:
    from xmllm.examples import builder_for, example_builder
    from xmllm.examples.dataset import dataset_example
    from xmllm.examples.sample import sample_example
    from xmllm.examples.training import training_example

    assert builder_for(get_explainer("relevancy.modality")) is sample_example
    assert builder_for(get_explainer("training.compare")) is training_example
    dataset_ids = [eid for eid, cls in registered().items() if cls.scope == "dataset"]
    assert dataset_ids and all(builder_for(get_explainer(e)) is dataset_example for e in dataset_ids)
    with pytest.raises(ValueError, match="already registered"):
        example_builder("sample")(lambda session, cls: None)
